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
