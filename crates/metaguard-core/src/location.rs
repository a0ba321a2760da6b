//! Byte offsets → human positions (1-based line and column) in a text.

/// A 1-based line/column position in a text, columns counted in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    /// Position of byte `offset` in `text`. Offsets past the end clamp to
    /// the end; offsets inside a multi-byte character point at it.
    pub fn of(text: &str, offset: usize) -> Position {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = text[line_start..offset].chars().count() + 1;
        Position { line, column }
    }
}

/// The full line of `text` that holds byte `offset`, without its newline.
pub fn line_at(text: &str, offset: usize) -> &str {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    text[start..end].trim_end_matches('\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        let t = "ab\ncdé\nf";
        assert_eq!(Position::of(t, 0), Position { line: 1, column: 1 });
        assert_eq!(Position::of(t, 3), Position { line: 2, column: 1 });
        assert_eq!(Position::of(t, 5), Position { line: 2, column: 3 });
        // inside the two-byte é
        assert_eq!(Position::of(t, 6), Position { line: 2, column: 3 });
        assert_eq!(Position::of(t, 99), Position { line: 3, column: 2 });
        assert_eq!(line_at(t, 4), "cdé");
        assert_eq!(line_at(t, 99), "f");
    }
}
