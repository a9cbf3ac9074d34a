//! Key templates (`user:{id}`) and PostgreSQL names, parsed once and
//! rendered into SQL with every literal and identifier quoted.

use std::fmt;

/// One piece of a key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Literal(String),
    Column(String),
}

/// A cache key template: literal text and `{column}` references; `{{` and
/// `}}` stand for literal braces (so Redis hash tags can be written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    pub source: String,
    pub pieces: Vec<Piece>,
}

impl KeyTemplate {
    pub fn parse(source: &str) -> Result<KeyTemplate, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut column = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => {
                                return Err(format!(
                                    "key template `{source}`: `{{` without its `}}` (write `{{{{` for a literal brace)"
                                ));
                            }
                            Some(c) => column.push(c),
                        }
                    }
                    if column.is_empty() {
                        return Err(format!("key template `{source}`: empty column name `{{}}`"));
                    }
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Column(column));
                }
                '}' => {
                    return Err(format!(
                        "key template `{source}`: `}}` without its `{{` (write `}}}}` for a literal brace)"
                    ));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        if !pieces.iter().any(|p| matches!(p, Piece::Column(_))) {
            return Err(format!(
                "key template `{source}` names no column (e.g. `user:{{id}}`): it would invalidate the same key for every row"
            ));
        }
        Ok(KeyTemplate {
            source: source.to_string(),
            pieces,
        })
    }

    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Column(c) => Some(c.as_str()),
            Piece::Literal(_) => None,
        })
    }

    /// The SQL expression rendering the key from `row` (`NEW` or `OLD`):
    /// NULL when a column is NULL (no key can be rendered).
    pub fn sql(&self, row: &str) -> String {
        let parts: Vec<String> = self
            .pieces
            .iter()
            .map(|piece| match piece {
                Piece::Literal(text) => literal(text),
                Piece::Column(column) => format!("({row}.{}::text)", ident(column)),
            })
            .collect();
        format!("({})", parts.join(" || "))
    }

    /// False when two placeholders follow each other with no literal text
    /// between them (`{a}{b}`): a key could be split between them in
    /// several ways, so it cannot be read back into column values.
    pub fn is_invertible(&self) -> bool {
        !self
            .pieces
            .windows(2)
            .any(|w| matches!(w, [Piece::Column(_), Piece::Column(_)]))
    }

    /// Length of the literal text: the more, the more specific the
    /// template (`user:email:{e}` over `user:{id}` for `user:email:a@x`).
    pub fn literal_len(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Literal(text) => text.len(),
                Piece::Column(_) => 0,
            })
            .sum()
    }

    /// The Redis glob (`SCAN ... MATCH`) of the keys this template renders:
    /// each placeholder becomes `*`, glob metacharacters of the literal
    /// pieces are escaped.
    pub fn glob(&self) -> String {
        let mut glob = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => {
                    for c in text.chars() {
                        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                            glob.push('\\');
                        }
                        glob.push(c);
                    }
                }
                Piece::Column(_) => glob.push('*'),
            }
        }
        glob
    }

    /// Whether `key` has this template's shape: its literal pieces in
    /// order, any text (possibly empty) where the placeholders are — what
    /// [`glob`](Self::glob) matches.
    pub fn matches(&self, key: &str) -> bool {
        let mut rest = key;
        let mut anchored = true;
        for (i, piece) in self.pieces.iter().enumerate() {
            match piece {
                Piece::Column(_) => anchored = false,
                Piece::Literal(text) if anchored => match rest.strip_prefix(text.as_str()) {
                    Some(after) => rest = after,
                    None => return false,
                },
                // The last literal must end the key; others match at their
                // first occurrence (leftmost is never worse for a glob).
                Piece::Literal(text) if i == self.pieces.len() - 1 => {
                    return rest.ends_with(text.as_str());
                }
                Piece::Literal(text) => match rest.find(text.as_str()) {
                    Some(at) => {
                        rest = &rest[at + text.len()..];
                        anchored = true;
                    }
                    None => return false,
                },
            }
        }
        !anchored || rest.is_empty()
    }

    /// Reads a cached key back into the column values it was rendered
    /// from, `(column, value)` in template order (a column named twice must
    /// capture the same text both times). The literal pieces must match; a
    /// placeholder captures the text up to an occurrence of the next
    /// literal piece. When a captured value may contain that literal
    /// (`user:{email}:v1` and the key `user:a:v1:v1`) every split is
    /// tried, and only a key with exactly one split that fits is read.
    pub fn parse_key(&self, key: &str) -> Result<Vec<(String, String)>, KeyParseError> {
        if !self.is_invertible() {
            return Err(KeyParseError::AmbiguousTemplate);
        }
        let mut search = Search {
            pieces: &self.pieces,
            key,
            steps: 0,
            found: Vec::new(),
        };
        search.walk(0, 0, &mut Vec::new());
        match (search.steps > Search::MAX_STEPS, search.found.len()) {
            (false, 1) => Ok(search.found.pop().expect("one split")),
            (false, 0) => Err(KeyParseError::NoMatch),
            _ => Err(KeyParseError::AmbiguousKey),
        }
    }
}

/// Why [`KeyTemplate::parse_key`] could not read a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyParseError {
    /// The template has adjacent placeholders (see
    /// [`KeyTemplate::is_invertible`]).
    AmbiguousTemplate,
    /// The key does not have the template's shape.
    NoMatch,
    /// Several splits of the key fit the template (or there were too many
    /// to try).
    AmbiguousKey,
}

impl fmt::Display for KeyParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyParseError::AmbiguousTemplate => "two placeholders with no literal text between them",
            KeyParseError::NoMatch => "the key does not have the template's shape",
            KeyParseError::AmbiguousKey => {
                "the key splits into column values in more than one way (or too many to try)"
            }
        })
    }
}

/// The backtracking behind [`KeyTemplate::parse_key`]: stops at the second
/// split found, or after `MAX_STEPS` (only a pathological key gets near).
struct Search<'a> {
    pieces: &'a [Piece],
    key: &'a str,
    steps: usize,
    found: Vec<Vec<(String, String)>>,
}

impl Search<'_> {
    const MAX_STEPS: usize = 100_000;

    fn walk(&mut self, piece: usize, at: usize, captured: &mut Vec<(String, String)>) {
        self.steps += 1;
        if self.found.len() > 1 || self.steps > Self::MAX_STEPS {
            return;
        }
        let rest = &self.key[at..];
        match self.pieces.get(piece) {
            None if rest.is_empty() => self.found.push(captured.clone()),
            None => {}
            Some(Piece::Literal(text)) if rest.starts_with(text.as_str()) => {
                self.walk(piece + 1, at + text.len(), captured);
            }
            Some(Piece::Literal(_)) => {}
            Some(Piece::Column(column)) => {
                // The next piece is a literal (the template is invertible)
                // or the end of the key.
                let ends: Vec<usize> = match self.pieces.get(piece + 1) {
                    Some(Piece::Literal(next)) => rest
                        .char_indices()
                        .map(|(i, _)| i)
                        .filter(|&i| rest[i..].starts_with(next.as_str()))
                        .collect(),
                    _ => vec![rest.len()],
                };
                for end in ends {
                    let value = &rest[..end];
                    let consistent = captured.iter().all(|(c, v)| c != column || v == value);
                    if consistent {
                        captured.push((column.clone(), value.to_string()));
                        self.walk(piece + 1, at + end, captured);
                        captured.pop();
                    }
                }
            }
        }
    }
}

/// A possibly schema-qualified name, `schema.name` (default schema
/// `public`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl QualifiedName {
    pub fn parse(text: &str) -> Result<QualifiedName, String> {
        let (schema, name) = text.split_once('.').unwrap_or(("public", text));
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return Err(format!(
                "bad table name `{text}` (expected `table` or `schema.table`)"
            ));
        }
        Ok(QualifiedName {
            schema: schema.to_string(),
            name: name.to_string(),
        })
    }

    /// `"schema"."name"`, quoted for SQL.
    pub fn sql(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A quoted SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A quoted SQL string literal.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_columns_literals_and_escaped_braces() {
        let t = KeyTemplate::parse("user:{{{id}}}:{email}").unwrap();
        assert_eq!(
            t.pieces,
            vec![
                Piece::Literal("user:{".into()),
                Piece::Column("id".into()),
                Piece::Literal("}:".into()),
                Piece::Column("email".into()),
            ]
        );
        assert_eq!(
            t.sql("NEW"),
            r#"('user:{' || (NEW."id"::text) || '}:' || (NEW."email"::text))"#
        );
        for bad in ["user:{id", "user:{}", "user:}", "user:{a{b}}", "static"] {
            assert!(KeyTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    fn parsed(template: &str, key: &str) -> Result<Vec<(String, String)>, KeyParseError> {
        KeyTemplate::parse(template).unwrap().parse_key(key)
    }

    fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(c, v)| (c.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_read_back_into_the_values_they_were_rendered_from() {
        // Round trip: render in Rust as the trigger renders in SQL, read back.
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("user:{id}", &[("id", "42")]),
            ("user:email:{email}", &[("email", "a@x.org")]),
            ("{tenant}/user:{id}:v2", &[("tenant", "acme:eu"), ("id", "7")]),
            ("t:{a}-{b}", &[("a", "x"), ("b", "y_z")]),
            ("user:{id}", &[("id", "")]),
            ("ключ:{id}", &[("id", "значение")]),
        ];
        for (template, values) in cases {
            let t = KeyTemplate::parse(template).unwrap();
            let mut key = String::new();
            let mut next = values.iter();
            for piece in &t.pieces {
                match piece {
                    Piece::Literal(text) => key.push_str(text),
                    Piece::Column(_) => key.push_str(next.next().unwrap().1),
                }
            }
            assert!(t.matches(&key), "{template} {key}");
            assert_eq!(t.parse_key(&key), Ok(pairs(values)), "{template} {key}");
        }
        // A value containing the next literal: the only split that fits.
        assert_eq!(
            parsed("user:{email}:v1", "user:a:v1:v1"),
            Ok(pairs(&[("email", "a:v1")]))
        );
        // A column named twice must capture the same text.
        assert_eq!(parsed("{id}:{id}", "7:7"), Ok(pairs(&[("id", "7"), ("id", "7")])));
        assert_eq!(parsed("{id}:{id}", "7:8"), Err(KeyParseError::NoMatch));
    }

    #[test]
    fn keys_that_split_several_ways_or_do_not_fit_are_not_read() {
        assert_eq!(
            parsed("pair:{a}:{b}", "pair:x:y:z"),
            Err(KeyParseError::AmbiguousKey)
        );
        assert_eq!(parsed("{a}{b}", "xy"), Err(KeyParseError::AmbiguousTemplate));
        assert_eq!(parsed("x{a}{b}:y", "x1:y"), Err(KeyParseError::AmbiguousTemplate));
        assert!(!KeyTemplate::parse("{a}{b}").unwrap().is_invertible());
        assert!(KeyTemplate::parse("{a}.{b}").unwrap().is_invertible());
        for (template, key) in [
            ("user:{id}", "usr:1"),
            ("user:{id}", "user"),
            ("user:{id}:name", "user:1:nam"),
            ("user:{id}:name", "user:1:name:"),
            ("a:{x}:b:{y}", "a:1:c:2"),
        ] {
            assert_eq!(
                parsed(template, key),
                Err(KeyParseError::NoMatch),
                "{template} {key}"
            );
            assert!(
                !KeyTemplate::parse(template).unwrap().matches(key),
                "{template} {key}"
            );
        }
        // A pathological key gives up (bounded work) instead of guessing.
        let key = ":".repeat(400);
        assert_eq!(
            parsed("{a}:{b}:{c}:{d}:{e}:x", &key),
            Err(KeyParseError::AmbiguousKey)
        );
    }

    #[test]
    fn literal_braces_are_matched_as_text() {
        let t = KeyTemplate::parse("user:{{{id}}}:name").unwrap();
        assert_eq!(t.parse_key("user:{42}:name"), Ok(pairs(&[("id", "42")])));
        assert_eq!(t.parse_key("user:42:name"), Err(KeyParseError::NoMatch));
        assert_eq!(t.glob(), "user:{*}:name");
        assert_eq!(t.literal_len(), "user:{}:name".len());
        let t = KeyTemplate::parse("{{x}}:{id}").unwrap();
        assert_eq!(t.parse_key("{x}:9"), Ok(pairs(&[("id", "9")])));
    }

    #[test]
    fn globs_escape_metacharacters_of_the_literal_pieces() {
        let t = KeyTemplate::parse(r"a*b?[c]\d:{id}").unwrap();
        assert_eq!(t.glob(), r"a\*b\?\[c\]\\d:*");
        assert!(t.matches(r"a*b?[c]\d:5") && !t.matches(r"aXb?[c]\d:5"));
        assert_eq!(KeyTemplate::parse("{a}{b}:x").unwrap().glob(), "**:x");
    }

    #[test]
    fn names_and_literals_are_quoted() {
        let t = KeyTemplate::parse("it's:{we\"ird}").unwrap();
        assert_eq!(t.sql("OLD"), r#"('it''s:' || (OLD."we""ird"::text))"#);
        let n = QualifiedName::parse("users").unwrap();
        assert_eq!(n.sql(), r#""public"."users""#);
        let n = QualifiedName::parse("app.User").unwrap();
        assert_eq!(
            (n.sql(), n.to_string()),
            (r#""app"."User""#.into(), "app.User".into())
        );
        assert!(QualifiedName::parse("a.b.c").is_err());
        assert!(QualifiedName::parse(".b").is_err());
    }
}
