use super::*;

fn ttl(v: &str) -> Option<u64> {
    parse_ttl(HeaderValue::from_str(v).ok().as_ref())
}

#[test]
fn ttl_bounds_and_garbage() {
    assert_eq!(ttl("1"), Some(1));
    assert_eq!(ttl("21600"), Some(21_600));
    assert_eq!(ttl("0060"), Some(60));
    for bad in [
        "",
        "0",
        "21601",
        "-1",
        "+5",
        "1.5",
        "abc",
        " 5x",
        "99999999999999999999999999",
    ] {
        assert_eq!(ttl(bad), None, "{bad:?}");
    }
    assert_eq!(parse_ttl(None), None);
    let non_utf8 = HeaderValue::from_bytes(b"\xff\xfe").ok();
    assert_eq!(parse_ttl(non_utf8.as_ref()), None);
}

#[test]
fn base64url_matches_known_vectors() {
    assert_eq!(base64url(b""), "");
    assert_eq!(base64url(b"f"), "Zg==");
    assert_eq!(base64url(b"fo"), "Zm8=");
    assert_eq!(base64url(b"foo"), "Zm9v");
    assert_eq!(base64url(&[0xfb, 0xff]), "-_8=");
}

#[test]
fn tokens_look_real_and_differ() {
    let imds = ImdsEmulator::new(ImdsSettings::default());
    let a = imds.new_token();
    let b = imds.new_token();
    assert!(a.starts_with("AQAEA"), "{a}");
    assert_eq!(a.len(), 56);
    assert_ne!(a, b);
}

#[test]
fn routing() {
    let imds = ImdsEmulator::new(ImdsSettings::default());
    let body = |p: &str| match imds.route(p) {
        Routed::Body(b) => b,
        Routed::Redirect(l) => format!("redirect {l}"),
        Routed::NotFound => "404".to_string(),
    };
    assert!(body("/").ends_with("2021-03-23\nlatest"));
    assert_eq!(body("/latest"), "redirect /latest/");
    assert_eq!(body("/latest/"), "dynamic\nmeta-data");
    assert_eq!(body("/latest/meta-data"), "redirect /latest/meta-data/");
    assert!(body("/latest/meta-data/").contains("\niam/\n"));
    assert_eq!(body("/latest/meta-data/instance-id"), "i-0123456789abcdef0");
    assert_eq!(
        body("/latest/meta-data/instance-id/"),
        "i-0123456789abcdef0"
    );
    assert_eq!(
        body("/2021-03-23/meta-data/instance-id"),
        "i-0123456789abcdef0"
    );
    assert_eq!(
        body("/latest/meta-data/placement/"),
        "availability-zone\nregion"
    );
    assert_eq!(
        body("/latest/meta-data/iam/security-credentials/"),
        "lab-instance-role"
    );
    assert_eq!(body("/latest/meta-data//instance-id"), "404");
    assert_eq!(body("/latest/meta-data/instance-id/x"), "404");
    assert_eq!(body("/latest/user-data"), "404");
    assert_eq!(body("/nope/meta-data/"), "404");
    assert_eq!(
        body("/latest/meta-data/local-hostname"),
        "ip-10-0-0-10.ec2.internal"
    );
}

#[test]
fn no_role_no_iam() {
    let imds = ImdsEmulator::new(ImdsSettings {
        role: None,
        region: "eu-west-1".into(),
        ..ImdsSettings::default()
    });
    assert!(imds.role_credentials().is_none());
    match imds.route("/latest/meta-data/") {
        Routed::Body(b) => assert!(!b.contains("iam")),
        _ => panic!("listing expected"),
    }
    assert!(matches!(
        imds.route("/latest/meta-data/iam/"),
        Routed::NotFound
    ));
    match imds.route("/latest/meta-data/hostname") {
        Routed::Body(b) => assert_eq!(b, "ip-10-0-0-10.eu-west-1.compute.internal"),
        _ => panic!("hostname expected"),
    }
}

#[test]
fn aws_json_layout() {
    let s = aws_json(&fields(&[("Code", json!("Success")), ("x", Value::Null)]));
    assert_eq!(s, "{\n  \"Code\" : \"Success\",\n  \"x\" : null\n}");
}
