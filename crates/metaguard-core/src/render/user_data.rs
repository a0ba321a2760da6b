//! EC2 user data: a MIME multipart message, laid out as AWS documents it
//! for ECS container instances ("Bootstrapping container instances with
//! Amazon EC2 user data"): a `text/cloud-boothook` part (the boothook
//! kind, byte for byte) and a `text/x-shellscript` part that writes the
//! cluster name and the policy's settings into `/etc/ecs/ecs.config`.
//!
//! The shell script runs once per instance in cloud-init's final stage;
//! on the ECS-optimized AMIs `ecs.service` starts after that stage, so the
//! agent reads the settings on its first start. It replaces earlier values
//! of the keys it owns (and its own earlier block) and keeps other lines.

use super::ecs_config::{self, KEYS};
use super::{boothook, Kind, Options, RenderError, Source, Stamp, ECS_CONFIG_PATH, MIME_LINE_MAX};

pub fn render(stamp: &Stamp, src: &Source<'_>, opts: &Options) -> Result<String, RenderError> {
    let hook = boothook::render(stamp, src, opts)?;
    let script = ecs_script(stamp, src, opts)?;
    let boundary = format!("==METAGUARD_{}==", stamp.short());
    let delimiter = format!("--{boundary}");
    for part in [&hook, &script] {
        if part.lines().any(|l| l.starts_with(&delimiter)) {
            return Err(RenderError::MarkerCollision {
                kind: Kind::UserData,
                marker: delimiter,
            });
        }
    }
    let mut out = format!(
        "\
Content-Type: multipart/mixed; boundary=\"{boundary}\"
MIME-Version: 1.0

EC2 user data rendered by metaguard {version} (`metaguard render user-data`).
Config: {origin} {hash}
Parts: a cloud-init boothook (metaguard's config and rules, every boot,
before Docker) and a shell script writing {ECS_CONFIG_PATH} (once).
",
        version = stamp.version,
        origin = stamp.origin,
        hash = stamp.hash,
    );
    for (ctype, filename, body) in [
        ("text/cloud-boothook", "metaguard-boothook.sh", &hook),
        ("text/x-shellscript", "metaguard-ecs-config.sh", &script),
    ] {
        let (charset, encoding) = if body.is_ascii() {
            ("us-ascii", "7bit")
        } else {
            ("utf-8", "8bit")
        };
        // The line break before a delimiter belongs to the delimiter
        // (RFC 2046), so the blank line keeps the part's final newline.
        out.push_str(&format!(
            "\n{delimiter}\n\
             Content-Type: {ctype}; charset=\"{charset}\"\n\
             MIME-Version: 1.0\n\
             Content-Transfer-Encoding: {encoding}\n\
             Content-Disposition: attachment; filename=\"{filename}\"\n\
             \n\
             {body}"
        ));
    }
    out.push_str(&format!("\n{delimiter}--\n"));
    if let Some((i, l)) = out
        .lines()
        .enumerate()
        .find(|(_, l)| l.len() > MIME_LINE_MAX)
    {
        return Err(RenderError::LineTooLong {
            kind: Kind::UserData,
            line: i + 1,
            len: l.len(),
        });
    }
    Ok(out)
}

fn ecs_script(stamp: &Stamp, src: &Source<'_>, opts: &Options) -> Result<String, RenderError> {
    let block = format!(
        "# BEGIN metaguard\n{}# END metaguard\n",
        ecs_config::render(stamp, src.config, opts)
    );
    let eof = format!("METAGUARD_ECS_{}", stamp.short());
    if block.lines().any(|l| l == eof) {
        return Err(RenderError::MarkerCollision {
            kind: Kind::UserData,
            marker: eof,
        });
    }
    let keys = KEYS.join("|");
    Ok(format!(
        "\
#!/bin/bash
# metaguard: writes the ECS agent's settings for this instance to
# {ECS_CONFIG_PATH}: the cluster name and what the metaguard policy implies.
{stamp}#
# cloud-init runs this once per instance, in its final stage, before the ECS
# agent first starts. Earlier values of the keys written here (and an earlier
# metaguard block) are replaced; all other lines are kept.
set -euo pipefail
umask 022

f={ECS_CONFIG_PATH}
mkdir -p \"$(dirname \"$f\")\"
touch \"$f\"
tmp=$(mktemp \"$f.XXXXXX\")
trap 'rm -f \"$tmp\"' EXIT
awk '/^# BEGIN metaguard$/ {{ skip = 1 }}
     !skip && !/^({keys})=/ {{ print }}
     /^# END metaguard$/ {{ skip = 0 }}' \"$f\" >\"$tmp\"
cat >>\"$tmp\" <<'{eof}'
{block}{eof}
chmod 0644 \"$tmp\"
mv -f \"$tmp\" \"$f\"
trap - EXIT
",
        stamp = stamp.lines("# ", Kind::UserData),
    ))
}
