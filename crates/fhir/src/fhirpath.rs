//! A compiler and evaluator for the subset of FHIRPath that the R4
//! SearchParameter expressions use.
//!
//! Why hand-written: the FHIRPath crates available evaluate over generated
//! typed models (large compile cost, every resource type compiled in) while
//! Custos keeps resources as JSON. Search parameters use a small, fixed part
//! of the language (paths, `|`, `where`, `as`/`ofType`/`is`, `resolve() is`,
//! `exists()`, `extension('url')`, indexers, `first()`), so each expression
//! is compiled once into a small program evaluated straight on `serde_json`.
//!
//! # Supported language
//!
//! * Paths. An identifier that starts a path and names a resource type
//!   (`Patient.name`) filters the input by `resourceType`; `Resource` matches
//!   any resource and `DomainResource` any but Bundle, Binary and Parameters.
//!   Other identifiers navigate from the focus. JSON arrays are flattened.
//! * FHIR choice elements: `Observation.value` finds `valueQuantity`,
//!   `valueString` …, and the node remembers the type suffix
//!   ([`Node::choice_type`]) for type tests.
//! * Literals: `'string'` (with FHIRPath escapes), numbers, `true`, `false`,
//!   `{}`; `$this`; `%resource` / `%context` / `%rootResource`.
//! * Operators: `|`, `=`, `!=`, `and`, `or`, `xor`, `implies`, `is`, `as`.
//! * Functions: `where(c)`, `exists([c])`, `empty()`, `not()`, `first()`,
//!   `last()`, `tail()`, `hasValue()`, `as(T)`, `ofType(T)`, `is(T)`,
//!   `extension('url')`, `hasExtension('url')`, and `resolve()` only in the
//!   form `resolve() is T` (true when the reference's literal text names a
//!   resource of type `T`).
//! * Indexers `[n]` with an integer literal.
//!
//! Anything else (arithmetic, ordering comparisons, `descendants()`, a bare
//! `resolve()` …) is a compile error naming the construct.
//!
//! # Type tests
//!
//! `as`, `ofType` and `is` use the choice-element suffix when the node has
//! one (`Quantity` also accepts its profiles `Age`, `Count`, `Distance`,
//! `Duration`, `SimpleQuantity`, `MoneyQuantity`); resources are tested by
//! `resourceType`; other JSON values by their shape (a `date` is a string
//! that looks like a FHIR date, a `Reference` an object with `reference`,
//! `identifier` or `display` only, a `Period` an object with `start`/`end` …).
//! This is what search extraction needs, not a full type system.
//!
//! `as` applied to a collection of several items filters it (like
//! `ofType`), and `is` on several items is true when any item matches:
//! lenient where the specification would raise an error.
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::types::is_resource_type;

/// A compiled expression.
#[derive(Debug, Clone)]
pub struct Expr {
    prog: Arc<Prog>,
}

/// A node reached by evaluation: the JSON value plus, for FHIR choice
/// elements (`value[x]`), the type suffix it was found under (`"Quantity"`).
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    /// The JSON value reached.
    pub value: &'a Value,
    /// The type suffix of the choice element it was found under (`valueQuantity` → `Quantity`).
    pub choice_type: Option<&'a str>,
}

/// The boolean results of an expression (`Patient.deceased.exists() and …`)
/// are returned as nodes pointing at these.
static TRUE: Value = Value::Bool(true);
static FALSE: Value = Value::Bool(false);

/// Deepest nesting of parentheses / function arguments accepted by the compiler.
const MAX_DEPTH: usize = 64;
/// Deepest syntax tree accepted (a path step, an operator or a function
/// call is a level); bounds the recursion of compilation and evaluation.
const MAX_TREE_DEPTH: usize = 128;
/// Most tokens accepted in one expression (the longest R4 expression has a
/// few hundred); bounds the depth of the compiled tree and of evaluation.
const MAX_TOKENS: usize = 4096;

impl Expr {
    /// Compile an expression; `Err` names the unsupported construct.
    pub fn compile(source: &str) -> Result<Expr, String> {
        let tokens = lex(source)?;
        if tokens.len() > MAX_TOKENS {
            return Err(format!("expression too long (over {MAX_TOKENS} tokens)"));
        }
        let mut parser = Parser {
            tokens,
            pos: 0,
            depth: 0,
        };
        let ast = parser.parse_expr(0)?;
        if let Some(tok) = parser.peek() {
            return Err(format!(
                "unexpected {} after the end of the expression",
                tok.describe()
            ));
        }
        if ast_depth(&ast) > MAX_TREE_DEPTH {
            return Err(format!(
                "expression nested too deeply (over {MAX_TREE_DEPTH} levels)"
            ));
        }
        let prog = lower(ast)?;
        if may_yield_literal(&prog) {
            return Err("an expression whose result is a literal is not supported".into());
        }
        Ok(Expr {
            prog: Arc::new(prog),
        })
    }

    /// Evaluate against a resource; the collection of nodes reached, flattened
    /// (JSON arrays are expanded into their items).
    pub fn evaluate<'a>(&self, resource: &'a Value) -> Vec<Node<'a>> {
        let focus = [Item::Node(Node {
            value: resource,
            choice_type: None,
        })];
        let mut items = Vec::new();
        let ev = Eval { root: resource };
        ev.eval(&self.prog, &focus, &mut items);
        items
            .into_iter()
            .filter_map(|item| match item {
                Item::Node(n) => Some(n),
                Item::Bool(b) => Some(Node {
                    value: if b { &TRUE } else { &FALSE },
                    choice_type: None,
                }),
                // Excluded at compile time (`may_yield_literal`).
                Item::Str(_) | Item::Num(_) => None,
            })
            .collect()
    }

    /// Whether the expression yields at least one node on `resource`.
    pub fn exists_in(&self, resource: &Value) -> bool {
        !self.evaluate(resource).is_empty()
    }
}

// ---------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A backtick-delimited identifier: never a keyword.
    Quoted(String),
    Str(String),
    Num(f64, bool),
    Dot,
    LParen,
    RParen,
    LBracket,
    RBracket,
    LBrace,
    RBrace,
    Comma,
    Pipe,
    Eq,
    Ne,
    Equiv,
    NotEquiv,
    Lt,
    Gt,
    Le,
    Ge,
    Plus,
    Minus,
    Star,
    Slash,
    Amp,
    Special(String),
    Var(String),
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) | Tok::Quoted(s) => format!("identifier '{s}'"),
            Tok::Str(_) => "string literal".into(),
            Tok::Num(..) => "number".into(),
            Tok::Special(s) => format!("'${s}'"),
            Tok::Var(s) => format!("'%{s}'"),
            other => format!("'{}'", other.symbol()),
        }
    }

    fn symbol(&self) -> &'static str {
        match self {
            Tok::Dot => ".",
            Tok::LParen => "(",
            Tok::RParen => ")",
            Tok::LBracket => "[",
            Tok::RBracket => "]",
            Tok::LBrace => "{",
            Tok::RBrace => "}",
            Tok::Comma => ",",
            Tok::Pipe => "|",
            Tok::Eq => "=",
            Tok::Ne => "!=",
            Tok::Equiv => "~",
            Tok::NotEquiv => "!~",
            Tok::Lt => "<",
            Tok::Gt => ">",
            Tok::Le => "<=",
            Tok::Ge => ">=",
            Tok::Plus => "+",
            Tok::Minus => "-",
            Tok::Star => "*",
            Tok::Slash => "/",
            Tok::Amp => "&",
            _ => "?",
        }
    }
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '/' if chars.get(i + 1) == Some(&'/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                loop {
                    if i + 1 >= chars.len() {
                        return Err("unterminated comment".into());
                    }
                    if chars[i] == '*' && chars[i + 1] == '/' {
                        i += 2;
                        break;
                    }
                    i += 1;
                }
            }
            '\'' => {
                let (s, next) = lex_string(&chars, i + 1, '\'')?;
                toks.push(Tok::Str(s));
                i = next;
            }
            '`' => {
                let (s, next) = lex_string(&chars, i + 1, '`')?;
                toks.push(Tok::Quoted(s));
                i = next;
            }
            '0'..='9' => {
                let start = i;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
                let mut is_int = true;
                if i + 1 < chars.len() && chars[i] == '.' && chars[i + 1].is_ascii_digit() {
                    is_int = false;
                    i += 1;
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                }
                let text: String = chars[start..i].iter().collect();
                let n: f64 = text
                    .parse()
                    .map_err(|_| format!("invalid number '{text}'"))?;
                toks.push(Tok::Num(n, is_int));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                toks.push(Tok::Ident(chars[start..i].iter().collect()));
            }
            '$' | '%' => {
                let start = i + 1;
                i += 1;
                if c == '%' && chars.get(i) == Some(&'`') {
                    let (s, next) = lex_string(&chars, i + 1, '`')?;
                    toks.push(Tok::Var(s));
                    i = next;
                    continue;
                }
                if c == '%' && chars.get(i) == Some(&'\'') {
                    let (s, next) = lex_string(&chars, i + 1, '\'')?;
                    toks.push(Tok::Var(s));
                    i = next;
                    continue;
                }
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '-')
                {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                if name.is_empty() {
                    return Err(format!("'{c}' must be followed by a name"));
                }
                toks.push(if c == '$' {
                    Tok::Special(name)
                } else {
                    Tok::Var(name)
                });
            }
            '@' => return Err("date/time literals (@...) are not supported".into()),
            _ => {
                let two: String = chars[i..chars.len().min(i + 2)].iter().collect();
                let (tok, len) = match two.as_str() {
                    "!=" => (Tok::Ne, 2),
                    "!~" => (Tok::NotEquiv, 2),
                    "<=" => (Tok::Le, 2),
                    ">=" => (Tok::Ge, 2),
                    _ => (
                        match c {
                            '.' => Tok::Dot,
                            '(' => Tok::LParen,
                            ')' => Tok::RParen,
                            '[' => Tok::LBracket,
                            ']' => Tok::RBracket,
                            '{' => Tok::LBrace,
                            '}' => Tok::RBrace,
                            ',' => Tok::Comma,
                            '|' => Tok::Pipe,
                            '=' => Tok::Eq,
                            '~' => Tok::Equiv,
                            '<' => Tok::Lt,
                            '>' => Tok::Gt,
                            '+' => Tok::Plus,
                            '-' => Tok::Minus,
                            '*' => Tok::Star,
                            '/' => Tok::Slash,
                            '&' => Tok::Amp,
                            other => return Err(format!("unexpected character {other:?}")),
                        },
                        1,
                    ),
                };
                toks.push(tok);
                i += len;
            }
        }
    }
    Ok(toks)
}

/// A string or backtick literal body starting at `i`; returns it and the
/// index after the closing delimiter.
fn lex_string(chars: &[char], mut i: usize, delim: char) -> Result<(String, usize), String> {
    let mut out = String::new();
    loop {
        let Some(&c) = chars.get(i) else {
            return Err("unterminated string literal".into());
        };
        i += 1;
        if c == delim {
            return Ok((out, i));
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(&e) = chars.get(i) else {
            return Err("unterminated string literal".into());
        };
        i += 1;
        match e {
            '\'' | '"' | '`' | '\\' | '/' => out.push(e),
            'f' => out.push('\u{c}'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'u' => {
                let hex: String = chars
                    .get(i..i + 4)
                    .ok_or("truncated \\u escape")?
                    .iter()
                    .collect();
                let code = u32::from_str_radix(&hex, 16)
                    .map_err(|_| format!("invalid \\u escape '{hex}'"))?;
                out.push(
                    char::from_u32(code).ok_or_else(|| format!("invalid \\u escape '{hex}'"))?,
                );
                i += 4;
            }
            other => return Err(format!("invalid escape '\\{other}'")),
        }
    }
}

// ---------------------------------------------------------------------------
// Parser

#[derive(Debug)]
enum Ast {
    This,
    Root,
    Empty,
    Str(String),
    Num(f64, bool),
    Bool(bool),
    /// An identifier that starts a path (type filter or member of the focus).
    Ident(String),
    Member(Box<Ast>, String),
    Call(Box<Ast>, String, Vec<Ast>),
    Index(Box<Ast>, Box<Ast>),
    Binary(BinOp, Box<Ast>, Box<Ast>),
    Is(Box<Ast>, TypeName),
    As(Box<Ast>, TypeName),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BinOp {
    Union,
    Eq,
    Ne,
    And,
    Or,
    Xor,
    Implies,
}

enum Infix {
    Bin(BinOp),
    Is,
    As,
    Unsupported(&'static str),
}

struct Parser {
    tokens: Vec<Tok>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn expect(&mut self, want: Tok) -> Result<(), String> {
        match self.next() {
            Some(t) if t == want => Ok(()),
            Some(t) => Err(format!(
                "expected '{}', found {}",
                want.symbol(),
                t.describe()
            )),
            None => Err(format!(
                "expected '{}', found the end of the expression",
                want.symbol()
            )),
        }
    }

    fn enter(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            Err("expression nested too deeply".into())
        } else {
            Ok(())
        }
    }

    /// The infix operator at the cursor with its (left, right) binding powers.
    fn peek_infix(&self) -> Option<(Infix, u8, u8)> {
        let (op, prec) = match self.peek()? {
            Tok::Ident(s) => match s.as_str() {
                "implies" => (Infix::Bin(BinOp::Implies), 1),
                "or" => (Infix::Bin(BinOp::Or), 2),
                "xor" => (Infix::Bin(BinOp::Xor), 2),
                "and" => (Infix::Bin(BinOp::And), 3),
                "in" => (Infix::Unsupported("in"), 4),
                "contains" => (Infix::Unsupported("contains"), 4),
                "is" => (Infix::Is, 8),
                "as" => (Infix::As, 8),
                "div" => (Infix::Unsupported("div"), 10),
                "mod" => (Infix::Unsupported("mod"), 10),
                _ => return None,
            },
            Tok::Eq => (Infix::Bin(BinOp::Eq), 5),
            Tok::Ne => (Infix::Bin(BinOp::Ne), 5),
            Tok::Equiv => (Infix::Unsupported("~"), 5),
            Tok::NotEquiv => (Infix::Unsupported("!~"), 5),
            Tok::Lt => (Infix::Unsupported("<"), 6),
            Tok::Gt => (Infix::Unsupported(">"), 6),
            Tok::Le => (Infix::Unsupported("<="), 6),
            Tok::Ge => (Infix::Unsupported(">="), 6),
            Tok::Pipe => (Infix::Bin(BinOp::Union), 7),
            Tok::Plus => (Infix::Unsupported("+"), 9),
            Tok::Minus => (Infix::Unsupported("-"), 9),
            Tok::Amp => (Infix::Unsupported("&"), 9),
            Tok::Star => (Infix::Unsupported("*"), 10),
            Tok::Slash => (Infix::Unsupported("/"), 10),
            _ => return None,
        };
        Some((op, prec * 2, prec * 2 + 1))
    }

    fn parse_expr(&mut self, min_bp: u8) -> Result<Ast, String> {
        self.enter()?;
        let mut lhs = self.parse_term()?;
        lhs = self.parse_postfix(lhs)?;
        while let Some((op, lbp, rbp)) = self.peek_infix() {
            if lbp < min_bp {
                break;
            }
            self.pos += 1;
            lhs = match op {
                Infix::Unsupported(sym) => {
                    return Err(format!("operator '{sym}' is not supported"));
                }
                Infix::Is => Ast::Is(Box::new(lhs), self.parse_type()?),
                Infix::As => Ast::As(Box::new(lhs), self.parse_type()?),
                Infix::Bin(b) => {
                    let rhs = self.parse_expr(rbp)?;
                    Ast::Binary(b, Box::new(lhs), Box::new(rhs))
                }
            };
        }
        self.depth -= 1;
        Ok(lhs)
    }

    fn parse_term(&mut self) -> Result<Ast, String> {
        match self.next() {
            None => Err("unexpected end of the expression".into()),
            Some(Tok::Str(s)) => Ok(Ast::Str(s)),
            Some(Tok::Num(n, int)) => Ok(Ast::Num(n, int)),
            Some(Tok::LBrace) => {
                self.expect(Tok::RBrace)?;
                Ok(Ast::Empty)
            }
            Some(Tok::LParen) => {
                let inner = self.parse_expr(0)?;
                self.expect(Tok::RParen)?;
                Ok(inner)
            }
            Some(Tok::Special(name)) => match name.as_str() {
                "this" => Ok(Ast::This),
                other => Err(format!("'${other}' is not supported")),
            },
            Some(Tok::Var(name)) => match name.as_str() {
                "resource" | "context" | "rootResource" => Ok(Ast::Root),
                other => Err(format!("environment variable '%{other}' is not supported")),
            },
            Some(Tok::Ident(name)) => match name.as_str() {
                "true" => Ok(Ast::Bool(true)),
                "false" => Ok(Ast::Bool(false)),
                _ if self.peek() == Some(&Tok::LParen) => {
                    let args = self.parse_args()?;
                    Ok(Ast::Call(Box::new(Ast::This), name, args))
                }
                _ => Ok(Ast::Ident(name)),
            },
            Some(Tok::Quoted(name)) => Ok(Ast::Ident(name)),
            Some(Tok::Minus | Tok::Plus) => Err("arithmetic (unary +/-) is not supported".into()),
            Some(t) => Err(format!("unexpected {}", t.describe())),
        }
    }

    fn parse_postfix(&mut self, mut lhs: Ast) -> Result<Ast, String> {
        loop {
            match self.peek() {
                Some(Tok::Dot) => {
                    self.pos += 1;
                    let name = match self.next() {
                        Some(Tok::Ident(n) | Tok::Quoted(n)) => n,
                        Some(t) => {
                            return Err(format!(
                                "expected a name after '.', found {}",
                                t.describe()
                            ));
                        }
                        None => return Err("expected a name after '.'".into()),
                    };
                    if self.peek() == Some(&Tok::LParen) {
                        let args = self.parse_args()?;
                        lhs = Ast::Call(Box::new(lhs), name, args);
                    } else {
                        lhs = Ast::Member(Box::new(lhs), name);
                    }
                }
                Some(Tok::LBracket) => {
                    self.pos += 1;
                    let idx = self.parse_expr(0)?;
                    self.expect(Tok::RBracket)?;
                    lhs = Ast::Index(Box::new(lhs), Box::new(idx));
                }
                _ => return Ok(lhs),
            }
        }
    }

    fn parse_args(&mut self) -> Result<Vec<Ast>, String> {
        self.expect(Tok::LParen)?;
        let mut args = Vec::new();
        if self.peek() == Some(&Tok::RParen) {
            self.pos += 1;
            return Ok(args);
        }
        loop {
            args.push(self.parse_expr(0)?);
            match self.next() {
                Some(Tok::Comma) => continue,
                Some(Tok::RParen) => return Ok(args),
                Some(t) => return Err(format!("expected ',' or ')', found {}", t.describe())),
                None => return Err("unterminated argument list".into()),
            }
        }
    }

    /// A type specifier: `Name`, `FHIR.Name` or `System.Name`.
    fn parse_type(&mut self) -> Result<TypeName, String> {
        let first = match self.next() {
            Some(Tok::Ident(n) | Tok::Quoted(n)) => n,
            Some(t) => return Err(format!("expected a type name, found {}", t.describe())),
            None => return Err("expected a type name".into()),
        };
        if (first == "FHIR" || first == "System") && self.peek() == Some(&Tok::Dot) {
            self.pos += 1;
            let second = match self.next() {
                Some(Tok::Ident(n) | Tok::Quoted(n)) => n,
                _ => return Err(format!("expected a type name after '{first}.'")),
            };
            return Ok(TypeName::new(&second, first == "System"));
        }
        Ok(TypeName::new(&first, false))
    }
}

/// A type name of a type test. System types (`System.String`) are mapped to
/// the FHIR primitive they hold.
#[derive(Debug, Clone, PartialEq)]
struct TypeName(String);

impl TypeName {
    fn new(name: &str, system: bool) -> TypeName {
        if system {
            let mapped = match name {
                "String" => "string",
                "Boolean" => "boolean",
                "Integer" => "integer",
                "Decimal" => "decimal",
                "Date" => "date",
                "DateTime" => "dateTime",
                "Time" => "time",
                other => other,
            };
            return TypeName(mapped.to_string());
        }
        TypeName(name.to_string())
    }
}

/// Whether a type name given in an expression (`dateTime`) names the type
/// written as a choice suffix (`DateTime`): equal but for the case of the
/// first letter.
fn same_type_name(a: &str, b: &str) -> bool {
    let (mut ca, mut cb) = (a.chars(), b.chars());
    match (ca.next(), cb.next()) {
        (Some(x), Some(y)) => x.eq_ignore_ascii_case(&y) && ca.as_str() == cb.as_str(),
        _ => false,
    }
}

/// Data types that can appear as the suffix of a choice element in JSON
/// (`valueQuantity`): the types allowed for `[x]` elements in R4.
const CHOICE_TYPES: &[&str] = &[
    "Address",
    "Age",
    "Annotation",
    "Attachment",
    "Base64Binary",
    "Boolean",
    "Canonical",
    "Code",
    "CodeableConcept",
    "Coding",
    "ContactDetail",
    "ContactPoint",
    "Contributor",
    "Count",
    "DataRequirement",
    "Date",
    "DateTime",
    "Decimal",
    "Distance",
    "Dosage",
    "Duration",
    "Expression",
    "HumanName",
    "Id",
    "Identifier",
    "Instant",
    "Integer",
    "Markdown",
    "Meta",
    "Money",
    "Oid",
    "ParameterDefinition",
    "Period",
    "PositiveInt",
    "Quantity",
    "Range",
    "Ratio",
    "Reference",
    "RelatedArtifact",
    "SampledData",
    "Signature",
    "String",
    "Time",
    "Timing",
    "TriggerDefinition",
    "UnsignedInt",
    "Uri",
    "Url",
    "UsageContext",
    "Uuid",
];

/// Profiles of Quantity: `as(Quantity)` accepts them.
const QUANTITY_KINDS: &[&str] = &[
    "Age",
    "Count",
    "Distance",
    "Duration",
    "MoneyQuantity",
    "SimpleQuantity",
];

// ---------------------------------------------------------------------------
// Program

#[derive(Debug)]
enum Prog {
    /// The focus (`$this`, or the implicit start of a path).
    Focus,
    /// The resource evaluation started from.
    Root,
    Empty,
    Str(String),
    Num(f64),
    Bool(bool),
    /// A path starting with a resource type name: the focus items of that type.
    TypeRoot(String),
    /// Per-item steps applied to each item of `base`.
    Path(Box<Prog>, Vec<Step>),
    Index(Box<Prog>, usize),
    First(Box<Prog>),
    Last(Box<Prog>),
    Tail(Box<Prog>),
    Exists(Box<Prog>),
    IsEmpty(Box<Prog>),
    Not(Box<Prog>),
    HasValue(Box<Prog>),
    HasExtension(Box<Prog>, String),
    IsType(Box<Prog>, TypeName),
    ResolveIs(Box<Prog>, TypeName),
    Union(Vec<Prog>),
    Equals(Box<Prog>, Box<Prog>, bool),
    Logic(BinOp, Box<Prog>, Box<Prog>),
}

#[derive(Debug)]
enum Step {
    Member(String),
    Where(Prog),
    OfType(TypeName),
    Extension(String),
}

fn path(base: Prog, step: Step) -> Prog {
    match base {
        Prog::Path(b, mut steps) => {
            steps.push(step);
            Prog::Path(b, steps)
        }
        other => Prog::Path(Box::new(other), vec![step]),
    }
}

/// The depth of a syntax tree, computed without recursion.
fn ast_depth(ast: &Ast) -> usize {
    let mut max = 0;
    let mut stack = vec![(ast, 1usize)];
    while let Some((node, depth)) = stack.pop() {
        max = max.max(depth);
        match node {
            Ast::This
            | Ast::Root
            | Ast::Empty
            | Ast::Str(_)
            | Ast::Num(..)
            | Ast::Bool(_)
            | Ast::Ident(_) => {}
            Ast::Member(base, _) | Ast::Is(base, _) | Ast::As(base, _) => {
                stack.push((base, depth + 1))
            }
            Ast::Call(base, _, args) => {
                stack.push((base, depth + 1));
                stack.extend(args.iter().map(|a| (a, depth + 1)));
            }
            Ast::Index(base, idx) => {
                stack.push((base, depth + 1));
                stack.push((idx, depth + 1));
            }
            Ast::Binary(_, l, r) => {
                stack.push((l, depth + 1));
                stack.push((r, depth + 1));
            }
        }
    }
    max
}

fn lower(ast: Ast) -> Result<Prog, String> {
    Ok(match ast {
        Ast::This => Prog::Focus,
        Ast::Root => Prog::Root,
        Ast::Empty => Prog::Empty,
        Ast::Str(s) => Prog::Str(s),
        Ast::Num(n, _) => Prog::Num(n),
        Ast::Bool(b) => Prog::Bool(b),
        Ast::Ident(name) => {
            if is_resource_type(&name) || name == "Resource" || name == "DomainResource" {
                Prog::TypeRoot(name)
            } else {
                path(Prog::Focus, Step::Member(name))
            }
        }
        Ast::Member(base, name) => path(lower(*base)?, Step::Member(name)),
        Ast::Index(base, idx) => {
            let n = match *idx {
                Ast::Num(n, true) if n >= 0.0 && n <= u32::MAX as f64 => n as usize,
                _ => return Err("indexers must be non-negative integer literals".into()),
            };
            Prog::Index(Box::new(lower(*base)?), n)
        }
        Ast::Binary(op, l, r) => {
            if op == BinOp::Eq || op == BinOp::Ne {
                Prog::Equals(Box::new(lower(*l)?), Box::new(lower(*r)?), op == BinOp::Ne)
            } else if op == BinOp::Union {
                let mut parts = Vec::new();
                for side in [*l, *r] {
                    match lower(side)? {
                        Prog::Union(inner) => parts.extend(inner),
                        p => parts.push(p),
                    }
                }
                Prog::Union(parts)
            } else {
                Prog::Logic(op, Box::new(lower(*l)?), Box::new(lower(*r)?))
            }
        }
        Ast::Is(base, ty) => lower_is(*base, ty)?,
        Ast::As(base, ty) => path(lower(*base)?, Step::OfType(ty)),
        Ast::Call(base, name, args) => lower_call(*base, name, args)?,
    })
}

/// `X is T`, and the special `resolve() is T`.
fn lower_is(base: Ast, ty: TypeName) -> Result<Prog, String> {
    if let Ast::Call(inner, name, args) = base {
        if name == "resolve" {
            if !args.is_empty() {
                return Err("resolve() takes no arguments".into());
            }
            return Ok(Prog::ResolveIs(Box::new(lower(*inner)?), ty));
        }
        return Ok(Prog::IsType(Box::new(lower_call(*inner, name, args)?), ty));
    }
    Ok(Prog::IsType(Box::new(lower(base)?), ty))
}

fn type_arg(name: &str, args: Vec<Ast>) -> Result<TypeName, String> {
    let mut args = args.into_iter();
    match (args.next(), args.next()) {
        (Some(Ast::Ident(t)), None) => Ok(TypeName::new(&t, false)),
        (Some(Ast::Member(base, t)), None) => match *base {
            Ast::Ident(ns) if ns == "FHIR" || ns == "System" => {
                Ok(TypeName::new(&t, ns == "System"))
            }
            _ => Err(format!("{name}() needs a type name")),
        },
        _ => Err(format!("{name}() takes exactly one type name")),
    }
}

fn string_arg(name: &str, args: Vec<Ast>) -> Result<String, String> {
    let mut args = args.into_iter();
    match (args.next(), args.next()) {
        (Some(Ast::Str(s)), None) => Ok(s),
        _ => Err(format!("{name}() takes exactly one string literal")),
    }
}

fn lower_call(base: Ast, name: String, args: Vec<Ast>) -> Result<Prog, String> {
    let no_args = |args: &[Ast]| {
        if args.is_empty() {
            Ok(())
        } else {
            Err(format!("{name}() takes no arguments"))
        }
    };
    let base_prog = |base: Ast| lower(base);
    Ok(match name.as_str() {
        "where" => {
            let mut args = args.into_iter();
            let (Some(c), None) = (args.next(), args.next()) else {
                return Err("where() takes exactly one criteria expression".into());
            };
            path(base_prog(base)?, Step::Where(lower(c)?))
        }
        "exists" => {
            let b = base_prog(base)?;
            let mut args = args.into_iter();
            match (args.next(), args.next()) {
                (None, _) => Prog::Exists(Box::new(b)),
                (Some(c), None) => Prog::Exists(Box::new(path(b, Step::Where(lower(c)?)))),
                _ => return Err("exists() takes at most one criteria expression".into()),
            }
        }
        "empty" => {
            no_args(&args)?;
            Prog::IsEmpty(Box::new(base_prog(base)?))
        }
        "not" => {
            no_args(&args)?;
            Prog::Not(Box::new(base_prog(base)?))
        }
        "first" => {
            no_args(&args)?;
            Prog::First(Box::new(base_prog(base)?))
        }
        "last" => {
            no_args(&args)?;
            Prog::Last(Box::new(base_prog(base)?))
        }
        "tail" => {
            no_args(&args)?;
            Prog::Tail(Box::new(base_prog(base)?))
        }
        "hasValue" => {
            no_args(&args)?;
            Prog::HasValue(Box::new(base_prog(base)?))
        }
        "as" | "ofType" => {
            let ty = type_arg(&name, args)?;
            path(base_prog(base)?, Step::OfType(ty))
        }
        "is" => {
            let ty = type_arg(&name, args)?;
            lower_is(base, ty)?
        }
        "extension" => {
            let url = string_arg(&name, args)?;
            path(base_prog(base)?, Step::Extension(url))
        }
        "hasExtension" => {
            let url = string_arg(&name, args)?;
            Prog::HasExtension(Box::new(base_prog(base)?), url)
        }
        "resolve" => return Err("resolve() is only supported as 'resolve() is Type'".into()),
        other => return Err(format!("function '{other}()' is not supported")),
    })
}

/// Whether the program can produce a string or number literal as a result
/// item (the public API returns nodes borrowed from the resource).
fn may_yield_literal(p: &Prog) -> bool {
    match p {
        Prog::Str(_) | Prog::Num(_) => true,
        Prog::Union(parts) => parts.iter().any(may_yield_literal),
        Prog::Index(b, _) | Prog::First(b) | Prog::Last(b) | Prog::Tail(b) => may_yield_literal(b),
        Prog::Path(b, steps) => {
            may_yield_literal(b)
                && steps
                    .iter()
                    .all(|s| matches!(s, Step::Where(_) | Step::OfType(_)))
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// Evaluation

/// One item of a collection during evaluation: a node of the resource, or a
/// value computed by the expression (literals borrow from the program).
#[derive(Debug, Clone, Copy)]
enum Item<'a, 'e> {
    Node(Node<'a>),
    Bool(bool),
    Str(&'e str),
    Num(f64),
}

struct Eval<'a> {
    root: &'a Value,
}

impl<'a> Eval<'a> {
    fn eval<'e>(&self, p: &'e Prog, focus: &[Item<'a, 'e>], out: &mut Vec<Item<'a, 'e>>) {
        match p {
            Prog::Focus => out.extend_from_slice(focus),
            Prog::Root => out.push(Item::Node(Node {
                value: self.root,
                choice_type: None,
            })),
            Prog::Empty => {}
            Prog::Str(s) => out.push(Item::Str(s)),
            Prog::Num(n) => out.push(Item::Num(*n)),
            Prog::Bool(b) => out.push(Item::Bool(*b)),
            Prog::TypeRoot(name) => {
                out.extend(
                    focus
                        .iter()
                        .filter(|item| is_resource_of(item, name))
                        .copied(),
                );
            }
            Prog::Path(base, steps) => match &**base {
                // Common starts: walk straight from the focus, no temporary collection.
                Prog::Focus => {
                    for item in focus {
                        self.walk(*item, steps, out);
                    }
                }
                Prog::TypeRoot(name) => {
                    for item in focus.iter().filter(|item| is_resource_of(item, name)) {
                        self.walk(*item, steps, out);
                    }
                }
                _ => {
                    let mut items = Vec::new();
                    self.eval(base, focus, &mut items);
                    for item in items {
                        self.walk(item, steps, out);
                    }
                }
            },
            Prog::Index(base, n) => {
                let items = self.collect(base, focus);
                if let Some(item) = items.get(*n) {
                    out.push(*item);
                }
            }
            Prog::First(base) => {
                if let Some(item) = self.collect(base, focus).first() {
                    out.push(*item);
                }
            }
            Prog::Last(base) => {
                if let Some(item) = self.collect(base, focus).last() {
                    out.push(*item);
                }
            }
            Prog::Tail(base) => {
                let items = self.collect(base, focus);
                out.extend(items.iter().skip(1).copied());
            }
            Prog::Exists(base) => out.push(Item::Bool(!self.collect(base, focus).is_empty())),
            Prog::IsEmpty(base) => out.push(Item::Bool(self.collect(base, focus).is_empty())),
            Prog::Not(base) => {
                if let Some(b) = to_bool(&self.collect(base, focus)) {
                    out.push(Item::Bool(!b));
                }
            }
            Prog::HasValue(base) => {
                let items = self.collect(base, focus);
                let has = items.len() == 1
                    && matches!(items[0], Item::Node(n) if matches!(n.value, Value::String(_) | Value::Number(_) | Value::Bool(_)));
                out.push(Item::Bool(has));
            }
            Prog::HasExtension(base, url) => {
                let items = self.collect(base, focus);
                let has = items
                    .iter()
                    .any(|item| extensions_with_url(item, url).next().is_some());
                out.push(Item::Bool(has));
            }
            Prog::IsType(base, ty) => {
                let items = self.collect(base, focus);
                if !items.is_empty() {
                    out.push(Item::Bool(items.iter().any(|i| is_type(i, &ty.0))));
                }
            }
            Prog::ResolveIs(base, ty) => {
                let items = self.collect(base, focus);
                if !items.is_empty() {
                    out.push(Item::Bool(items.iter().any(|i| reference_is(i, &ty.0))));
                }
            }
            Prog::Union(parts) => {
                let start = out.len();
                for part in parts {
                    self.eval(part, focus, out);
                }
                dedup_from(out, start);
            }
            Prog::Equals(l, r, negate) => {
                let left = self.collect(l, focus);
                let right = self.collect(r, focus);
                if !left.is_empty() && !right.is_empty() {
                    let eq = left.len() == right.len()
                        && left.iter().zip(&right).all(|(a, b)| items_equal(a, b));
                    out.push(Item::Bool(eq != *negate));
                }
            }
            Prog::Logic(op, l, r) => {
                let a = to_bool(&self.collect(l, focus));
                // Short-circuit where the left side decides.
                let decided = match (op, a) {
                    (BinOp::And, Some(false)) => Some(Some(false)),
                    (BinOp::Or, Some(true)) => Some(Some(true)),
                    (BinOp::Implies, Some(false)) => Some(Some(true)),
                    _ => None,
                };
                let result = match decided {
                    Some(r) => r,
                    None => {
                        let b = to_bool(&self.collect(r, focus));
                        logic(*op, a, b)
                    }
                };
                if let Some(v) = result {
                    out.push(Item::Bool(v));
                }
            }
        }
    }

    fn collect<'e>(&self, p: &'e Prog, focus: &[Item<'a, 'e>]) -> Vec<Item<'a, 'e>> {
        let mut v = Vec::new();
        self.eval(p, focus, &mut v);
        v
    }

    /// Apply `steps` to one item, depth first, pushing what is reached.
    fn walk<'e>(&self, item: Item<'a, 'e>, steps: &'e [Step], out: &mut Vec<Item<'a, 'e>>) {
        let Some((step, rest)) = steps.split_first() else {
            out.push(item);
            return;
        };
        match step {
            Step::Member(name) => {
                let Item::Node(node) = item else { return };
                let Value::Object(map) = node.value else {
                    return;
                };
                let Some((value, choice_type)) = member(map, name) else {
                    return;
                };
                match value {
                    Value::Array(items) => {
                        for v in items.iter().filter(|v| !v.is_null()) {
                            self.walk(
                                Item::Node(Node {
                                    value: v,
                                    choice_type,
                                }),
                                rest,
                                out,
                            );
                        }
                    }
                    Value::Null => {}
                    v => self.walk(
                        Item::Node(Node {
                            value: v,
                            choice_type,
                        }),
                        rest,
                        out,
                    ),
                }
            }
            Step::Where(criteria) => {
                let mut result = Vec::new();
                self.eval(criteria, &[item], &mut result);
                if to_bool(&result) == Some(true) {
                    self.walk(item, rest, out);
                }
            }
            Step::OfType(ty) => {
                if is_type(&item, &ty.0) {
                    self.walk(item, rest, out);
                }
            }
            Step::Extension(url) => {
                for ext in extensions_with_url(&item, url) {
                    self.walk(
                        Item::Node(Node {
                            value: ext,
                            choice_type: None,
                        }),
                        rest,
                        out,
                    );
                }
            }
        }
    }
}

/// The value of element `name` of an object, following FHIR choice
/// elements: `value` finds `valueQuantity` (with choice type `Quantity`).
fn member<'a>(map: &'a Map<String, Value>, name: &str) -> Option<(&'a Value, Option<&'a str>)> {
    if let Some(v) = map.get(name) {
        return Some((v, None));
    }
    map.iter().find_map(|(key, value)| {
        let suffix = key.strip_prefix(name)?;
        (suffix.starts_with(|c: char| c.is_ascii_uppercase())
            && CHOICE_TYPES.binary_search(&suffix).is_ok())
        .then_some((value, Some(suffix)))
    })
}

fn extensions_with_url<'a, 'b>(
    item: &Item<'a, '_>,
    url: &'b str,
) -> impl Iterator<Item = &'a Value> + use<'a, 'b> {
    let exts: &'a [Value] = match item {
        Item::Node(Node {
            value: Value::Object(map),
            ..
        }) => match map.get("extension") {
            Some(Value::Array(a)) => a.as_slice(),
            _ => &[],
        },
        _ => &[],
    };
    exts.iter()
        .filter(move |e| e.get("url").and_then(Value::as_str) == Some(url))
}

fn is_resource_of(item: &Item<'_, '_>, name: &str) -> bool {
    let Item::Node(Node {
        value: Value::Object(map),
        ..
    }) = item
    else {
        return false;
    };
    let rt = map.get("resourceType").and_then(Value::as_str);
    match name {
        "Resource" => true,
        "DomainResource" => !matches!(rt, Some("Bundle" | "Binary" | "Parameters")),
        _ => rt == Some(name),
    }
}

/// Remove repeated items (the same node reached twice) from `out[start..]`,
/// keeping first occurrences: union semantics, in linear time.
fn dedup_from(out: &mut Vec<Item<'_, '_>>, start: usize) {
    let n = out.len() - start;
    if n < 2 {
        return;
    }
    let mut write = start;
    if n <= 16 {
        for read in start..out.len() {
            let item = out[read];
            if !out[start..write].iter().any(|seen| same_item(seen, &item)) {
                out[write] = item;
                write += 1;
            }
        }
    } else {
        let mut seen = std::collections::HashSet::with_capacity(n);
        for read in start..out.len() {
            let item = out[read];
            let key = match item {
                Item::Node(node) => (0u8, node.value as *const Value as usize, 0usize),
                Item::Bool(b) => (1, usize::from(b), 0),
                Item::Str(s) => (2, s.as_ptr() as usize, s.len()),
                Item::Num(f) => (3, f.to_bits() as usize, 0),
            };
            if seen.insert(key) {
                out[write] = item;
                write += 1;
            }
        }
    }
    out.truncate(write);
}

fn same_item(a: &Item<'_, '_>, b: &Item<'_, '_>) -> bool {
    match (a, b) {
        (Item::Node(x), Item::Node(y)) => std::ptr::eq(x.value, y.value),
        (Item::Bool(x), Item::Bool(y)) => x == y,
        (Item::Str(x), Item::Str(y)) => x == y,
        (Item::Num(x), Item::Num(y)) => x == y,
        _ => false,
    }
}

fn items_equal(a: &Item<'_, '_>, b: &Item<'_, '_>) -> bool {
    fn as_value_eq(v: &Value, other: &Item<'_, '_>) -> bool {
        match (v, other) {
            (Value::String(s), Item::Str(t)) => s == t,
            (Value::Bool(x), Item::Bool(y)) => x == y,
            (Value::Number(n), Item::Num(m)) => n.as_f64() == Some(*m),
            (v, Item::Node(n)) => v == n.value,
            _ => false,
        }
    }
    match (a, b) {
        (Item::Node(n), other) => as_value_eq(n.value, other),
        (other, Item::Node(n)) => as_value_eq(n.value, other),
        _ => same_item(a, b),
    }
}

/// FHIRPath singleton evaluation of a collection as a boolean: empty is
/// unknown, a boolean is itself, any other single item is true.
fn to_bool(items: &[Item<'_, '_>]) -> Option<bool> {
    match items {
        [] => None,
        [Item::Bool(b)] => Some(*b),
        [
            Item::Node(Node {
                value: Value::Bool(b),
                ..
            }),
        ] => Some(*b),
        _ => Some(true),
    }
}

/// Three-valued logic of `and`, `or`, `xor`, `implies`.
fn logic(op: BinOp, a: Option<bool>, b: Option<bool>) -> Option<bool> {
    match op {
        BinOp::And => match (a, b) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        BinOp::Or => match (a, b) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        BinOp::Xor => Some(a? != b?),
        BinOp::Implies => match (a, b) {
            (Some(false), _) | (_, Some(true)) => Some(true),
            (Some(true), Some(false)) => Some(false),
            _ => None,
        },
        BinOp::Union | BinOp::Eq | BinOp::Ne => None,
    }
}

/// `resolve() is T` without resolving: whether the item is a Reference (or a
/// reference string) whose literal text names a resource of type `T`.
fn reference_is(item: &Item<'_, '_>, ty: &str) -> bool {
    let raw = match item {
        Item::Node(Node {
            value: Value::Object(map),
            ..
        }) => map.get("reference").and_then(Value::as_str),
        Item::Node(Node {
            value: Value::String(s),
            ..
        }) => Some(s.as_str()),
        Item::Str(s) => Some(*s),
        _ => None,
    };
    let Some((target, _)) = raw.and_then(crate::extract::reference_target) else {
        return false;
    };
    match ty {
        "Resource" => true,
        "DomainResource" => !matches!(target, "Bundle" | "Binary" | "Parameters"),
        _ => target == ty,
    }
}

/// Whether an item is of FHIR type `ty` (see the module documentation).
fn is_type(item: &Item<'_, '_>, ty: &str) -> bool {
    match item {
        Item::Bool(_) => same_type_name(ty, "boolean"),
        Item::Str(_) => same_type_name(ty, "string"),
        Item::Num(n) => {
            same_type_name(ty, "decimal") || (n.fract() == 0.0 && same_type_name(ty, "integer"))
        }
        Item::Node(node) => node_is_type(node, ty),
    }
}

fn node_is_type(node: &Node<'_>, ty: &str) -> bool {
    if matches!(ty, "Element" | "Base" | "Any") {
        return true;
    }
    if let Some(ct) = node.choice_type {
        return same_type_name(ty, ct) || (ty == "Quantity" && QUANTITY_KINDS.contains(&ct));
    }
    match node.value {
        Value::Bool(_) => ty == "boolean",
        Value::Number(n) => match ty {
            "decimal" => true,
            "integer" | "integer64" => n.is_i64() || n.is_u64(),
            "unsignedInt" => n.is_u64(),
            "positiveInt" => n.as_u64().is_some_and(|v| v > 0),
            _ => false,
        },
        Value::String(s) => string_is_type(s, ty),
        Value::Object(map) => object_is_type(map, ty),
        Value::Array(_) | Value::Null => false,
    }
}

fn string_is_type(s: &str, ty: &str) -> bool {
    let b = s.as_bytes();
    let date_like = b.len() >= 4 && b[..4].iter().all(u8::is_ascii_digit);
    match ty {
        "string" | "code" | "id" | "markdown" | "uri" | "url" | "canonical" | "oid" | "uuid"
        | "base64Binary" => true,
        "date" => date_like && b.len() <= 10 && crate::date::parse_range(s).is_some(),
        "dateTime" => date_like && crate::date::parse_range(s).is_some(),
        "instant" => {
            date_like
                && b.len() > 19
                && (s.ends_with('Z') || b[b.len() - 6] == b'+' || b[b.len() - 6] == b'-')
                && crate::date::parse_range(s).is_some()
        }
        "time" => {
            b.len() >= 8
                && b[2] == b':'
                && b[5] == b':'
                && [0, 1, 3, 4, 6, 7].iter().all(|&i| b[i].is_ascii_digit())
        }
        _ => false,
    }
}

/// Structural guess of a complex type, from the keys an object has.
fn object_is_type(map: &Map<String, Value>, ty: &str) -> bool {
    let has = |k: &str| map.contains_key(k);
    let only = |allowed: &[&str]| {
        map.keys().all(|k| {
            k == "id" || k == "extension" || k.starts_with('_') || allowed.contains(&k.as_str())
        })
    };
    if let Some(rt) = map.get("resourceType").and_then(Value::as_str) {
        return match ty {
            "Resource" => true,
            "DomainResource" => !matches!(rt, "Bundle" | "Binary" | "Parameters"),
            _ => rt == ty,
        };
    }
    match ty {
        "Reference" => {
            (has("reference") || has("identifier") || has("display"))
                && only(&["reference", "type", "identifier", "display"])
        }
        "Quantity" | "Age" | "Count" | "Distance" | "Duration" | "SimpleQuantity"
        | "MoneyQuantity" => {
            (has("value") || has("code") || has("unit"))
                && only(&["value", "comparator", "unit", "system", "code"])
        }
        "Money" => has("currency") && only(&["value", "currency"]),
        "Range" => (has("low") || has("high")) && only(&["low", "high"]),
        "Ratio" => (has("numerator") || has("denominator")) && only(&["numerator", "denominator"]),
        "Period" => (has("start") || has("end")) && only(&["start", "end"]),
        "CodeableConcept" => (has("coding") || has("text")) && only(&["coding", "text"]),
        "Coding" => {
            (has("code") || has("system") || has("display"))
                && only(&["system", "version", "code", "display", "userSelected"])
        }
        "Identifier" => {
            (has("value") || has("system"))
                && only(&["use", "type", "system", "value", "period", "assigner"])
                && !looks_like_contact_point(map)
        }
        "ContactPoint" => {
            (has("value") || has("system"))
                && only(&["system", "value", "use", "rank", "period"])
                && (looks_like_contact_point(map) || !has("system"))
        }
        "HumanName" => {
            ["family", "given", "prefix", "suffix", "text"]
                .iter()
                .any(|k| has(k))
                && only(&[
                    "use", "text", "family", "given", "prefix", "suffix", "period",
                ])
        }
        "Address" => {
            [
                "line",
                "city",
                "district",
                "state",
                "postalCode",
                "country",
                "text",
            ]
            .iter()
            .any(|k| has(k))
                && only(&[
                    "use",
                    "type",
                    "text",
                    "line",
                    "city",
                    "district",
                    "state",
                    "postalCode",
                    "country",
                    "period",
                ])
        }
        "Attachment" => {
            ["contentType", "data", "url", "size", "hash", "title"]
                .iter()
                .any(|k| has(k))
                && only(&[
                    "contentType",
                    "language",
                    "data",
                    "url",
                    "size",
                    "hash",
                    "title",
                    "creation",
                ])
        }
        "SampledData" => has("origin") && has("dimensions"),
        "Timing" => {
            (has("event") || has("repeat") || has("code")) && only(&["event", "repeat", "code"])
        }
        "Annotation" => has("text") && only(&["authorReference", "authorString", "time", "text"]),
        "Signature" => has("type") && has("when") && has("who"),
        _ => false,
    }
}

fn looks_like_contact_point(map: &Map<String, Value>) -> bool {
    matches!(
        map.get("system").and_then(Value::as_str),
        Some("phone" | "fax" | "email" | "pager" | "url" | "sms" | "other")
    ) || map.contains_key("rank")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn eval(expr: &str, resource: &Value) -> Vec<Value> {
        let e = Expr::compile(expr).unwrap_or_else(|err| panic!("{expr}: {err}"));
        e.evaluate(resource)
            .into_iter()
            .map(|n| n.value.clone())
            .collect()
    }

    fn choice_types(expr: &str, resource: &Value) -> Vec<Option<String>> {
        let e = Expr::compile(expr).unwrap();
        e.evaluate(resource)
            .into_iter()
            .map(|n| n.choice_type.map(str::to_string))
            .collect()
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "p1",
            "extension": [
                {"url": "http://example.org/birthPlace", "valueString": "Lyon"},
                {"url": "http://example.org/race", "valueCoding": {"system": "urn:race", "code": "2106-3"}}
            ],
            "name": [
                {"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
                {"use": "usual", "given": ["Jim"]}
            ],
            "telecom": [
                {"system": "phone", "value": "(03) 5555 6473", "use": "work", "rank": 1},
                {"system": "email", "value": "jim@example.org"},
                {"system": "phone", "value": "(03) 3410 5613", "use": "mobile"}
            ],
            "gender": "male",
            "birthDate": "1974-12-25",
            "deceasedBoolean": false,
            "active": true,
            "managingOrganization": {"reference": "Organization/1"},
            "generalPractitioner": [
                {"reference": "Practitioner/gp"},
                {"reference": "http://example.org/fhir/Organization/o2/_history/3"},
                {"reference": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"},
                {"reference": "#contained1"}
            ]
        })
    }

    fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body Weight"}]},
            "subject": {"reference": "Patient/p1"},
            "effectivePeriod": {"start": "2020-01-01T10:00:00Z", "end": "2020-01-01T11:00:00Z"},
            "valueQuantity": {"value": 67.5, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
            "component": [
                {"code": {"text": "a"}, "valueCodeableConcept": {"text": "high"}},
                {"code": {"text": "b"}, "valueQuantity": {"value": 1}},
                {"code": {"text": "c"}, "valueString": "x"}
            ]
        })
    }

    #[test]
    fn dotted_paths_flatten_arrays() {
        let p = patient();
        assert_eq!(eval("Patient.name.family", &p), vec![json!("Chalmers")]);
        assert_eq!(
            eval("Patient.name.given", &p),
            vec![json!("Peter"), json!("James"), json!("Jim")]
        );
        assert_eq!(eval("Patient.gender", &p), vec![json!("male")]);
        assert!(eval("Patient.nothing.here", &p).is_empty());
        assert!(eval("Patient.gender.family", &p).is_empty());
        // Backtick identifiers.
        assert_eq!(eval("Patient.`gender`", &p), vec![json!("male")]);
    }

    #[test]
    fn leading_type_name_filters() {
        let p = patient();
        assert!(eval("Observation.status", &p).is_empty());
        assert_eq!(eval("Resource.id", &p), vec![json!("p1")]);
        assert_eq!(eval("DomainResource.id", &p), vec![json!("p1")]);
        let bundle = json!({"resourceType": "Bundle", "id": "b"});
        assert_eq!(eval("Resource.id", &bundle), vec![json!("b")]);
        assert!(eval("DomainResource.id", &bundle).is_empty());
        // Multi-type union: only the matching branch contributes.
        let e = "Account.subject | Observation.subject | Patient.managingOrganization";
        assert_eq!(eval(e, &p), vec![json!({"reference": "Organization/1"})]);
        assert_eq!(
            eval(e, &observation()),
            vec![json!({"reference": "Patient/p1"})]
        );
    }

    #[test]
    fn union_and_parentheses() {
        let p = patient();
        assert_eq!(
            eval("Patient.gender | (Patient.birthDate)", &p),
            vec![json!("male"), json!("1974-12-25")]
        );
        // Duplicates (the same node) are removed.
        assert_eq!(
            eval("Patient.gender | Patient.gender", &p),
            vec![json!("male")]
        );
        assert_eq!(
            eval("(Patient.name | Patient.name).family", &p),
            vec![json!("Chalmers")]
        );
    }

    #[test]
    fn where_with_equality_and_logic() {
        let p = patient();
        assert_eq!(
            eval("Patient.telecom.where(system='phone').value", &p),
            vec![json!("(03) 5555 6473"), json!("(03) 3410 5613")]
        );
        assert_eq!(
            eval("Patient.telecom.where(system='email').value", &p),
            vec![json!("jim@example.org")]
        );
        assert_eq!(
            eval(
                "Patient.telecom.where(system = 'phone' and use = 'mobile').value",
                &p
            ),
            vec![json!("(03) 3410 5613")]
        );
        assert_eq!(
            eval(
                "Patient.telecom.where(use = 'mobile' or system = 'email').value",
                &p
            ),
            vec![json!("jim@example.org"), json!("(03) 3410 5613")]
        );
        assert_eq!(
            eval("Patient.telecom.where(rank = 1).use", &p),
            vec![json!("work")]
        );
        assert_eq!(
            eval("Patient.telecom.where(system != 'phone').value", &p),
            vec![json!("jim@example.org")]
        );
        assert_eq!(
            eval("Patient.name.where($this.use = 'usual').given", &p),
            vec![json!("Jim")]
        );
        assert_eq!(
            eval(
                "Patient.name.where(given.exists() and family.empty()).given",
                &p
            ),
            vec![json!("Jim")]
        );
        assert_eq!(
            eval("Patient.name.where(family.exists().not()).use", &p),
            vec![json!("usual")]
        );
    }

    #[test]
    fn resolve_is_type() {
        let p = patient();
        assert_eq!(
            eval(
                "Patient.generalPractitioner.where(resolve() is Practitioner)",
                &p
            ),
            vec![json!({"reference": "Practitioner/gp"})]
        );
        // Absolute URL with history.
        assert_eq!(
            eval(
                "Patient.generalPractitioner.where(resolve() is Organization)",
                &p
            ),
            vec![json!({"reference": "http://example.org/fhir/Organization/o2/_history/3"})]
        );
        // urn:uuid and contained references have no known type.
        assert!(
            eval(
                "Patient.generalPractitioner.where(resolve() is Patient)",
                &p
            )
            .is_empty()
        );
        assert_eq!(
            eval(
                "Patient.generalPractitioner.where(resolve() is Resource)",
                &p
            )
            .len(),
            2
        );
        assert_eq!(
            eval("Patient.managingOrganization.resolve() is Organization", &p),
            vec![json!(true)]
        );
        let o = observation();
        assert_eq!(
            eval("Observation.subject.where(resolve() is Patient)", &o),
            vec![json!({"reference": "Patient/p1"})]
        );
    }

    #[test]
    fn choice_elements() {
        let o = observation();
        assert_eq!(
            eval("Observation.value", &o),
            vec![o["valueQuantity"].clone()]
        );
        assert_eq!(
            choice_types("Observation.value", &o),
            vec![Some("Quantity".to_string())]
        );
        assert_eq!(
            choice_types("Observation.effective", &o),
            vec![Some("Period".to_string())]
        );
        assert_eq!(
            eval("(Observation.value as Quantity).value", &o),
            vec![json!(67.5)]
        );
        assert!(eval("Observation.value as CodeableConcept", &o).is_empty());
        assert_eq!(
            eval("Observation.effective.as(Period).start", &o),
            vec![json!("2020-01-01T10:00:00Z")]
        );
        assert!(eval("Observation.effective.as(dateTime)", &o).is_empty());
        assert_eq!(
            eval("Observation.effective.ofType(Period).end", &o),
            vec![json!("2020-01-01T11:00:00Z")]
        );
        assert_eq!(
            eval("(Observation.component.value as CodeableConcept).text", &o),
            vec![json!("high")]
        );
        assert_eq!(
            eval("Observation.component.value.ofType(Quantity).value", &o),
            vec![json!(1)]
        );
        assert_eq!(
            eval("Observation.component.value.as(string)", &o),
            vec![json!("x")]
        );
        assert_eq!(eval("Observation.value is Quantity", &o), vec![json!(true)]);
        assert_eq!(eval("Observation.value.is(Period)", &o), vec![json!(false)]);
        assert_eq!(
            eval("Observation.value.is(FHIR.Quantity)", &o),
            vec![json!(true)]
        );
        // Age is a Quantity.
        let c = json!({"resourceType": "Condition", "onsetAge": {"value": 40, "unit": "a"}});
        assert_eq!(
            eval("Condition.onset.as(Quantity).value", &c),
            vec![json!(40)]
        );
        assert_eq!(eval("Condition.onset.as(Age).value", &c), vec![json!(40)]);
        assert!(eval("Condition.onset.as(Range)", &c).is_empty());
        let d = json!({"resourceType": "Condition", "onsetDateTime": "2020-01-01"});
        assert_eq!(
            eval("Condition.onset.as(dateTime)", &d),
            vec![json!("2020-01-01")]
        );
        assert_eq!(
            eval("Condition.onset.as(System.DateTime)", &d),
            vec![json!("2020-01-01")]
        );
        // `valueSet` is not a choice of `value`.
        let q = json!({"resourceType": "Questionnaire", "item": [{"answerValueSet": "http://x"}]});
        assert!(eval("Questionnaire.item.answer", &q).is_empty());
    }

    #[test]
    fn shape_type_tests_on_plain_elements() {
        let p = patient();
        assert_eq!(
            eval("Patient.birthDate.as(date)", &p),
            vec![json!("1974-12-25")]
        );
        assert_eq!(
            eval("Patient.birthDate.as(dateTime)", &p),
            vec![json!("1974-12-25")]
        );
        assert!(eval("Patient.gender.as(date)", &p).is_empty());
        assert_eq!(eval("Patient.gender.as(code)", &p), vec![json!("male")]);
        assert_eq!(
            eval("Patient.managingOrganization.as(Reference)", &p).len(),
            1
        );
        assert!(eval("Patient.name.as(Reference)", &p).is_empty());
        assert_eq!(eval("Patient.name.ofType(HumanName)", &p).len(), 2);
        assert_eq!(eval("Patient.telecom.ofType(ContactPoint)", &p).len(), 3);
        assert!(eval("Patient.telecom.ofType(Identifier)", &p).is_empty());
        assert_eq!(eval("Patient.active.as(boolean)", &p), vec![json!(true)]);
        assert_eq!(eval("Patient.ofType(Patient).id", &p), vec![json!("p1")]);
        let o = observation();
        assert_eq!(
            eval(
                "Observation.code.as(CodeableConcept).coding.as(Coding).code",
                &o
            ),
            vec![json!("29463-7")]
        );
    }

    #[test]
    fn boolean_functions_and_results() {
        let p = patient();
        assert_eq!(eval("Patient.name.exists()", &p), vec![json!(true)]);
        assert_eq!(eval("Patient.photo.exists()", &p), vec![json!(false)]);
        assert_eq!(eval("Patient.photo.empty()", &p), vec![json!(true)]);
        assert_eq!(eval("Patient.active.not()", &p), vec![json!(false)]);
        assert!(eval("Patient.photo.not()", &p).is_empty());
        assert_eq!(
            eval("Patient.telecom.exists(system = 'email')", &p),
            vec![json!(true)]
        );
        assert_eq!(
            eval("Patient.telecom.exists(system = 'fax')", &p),
            vec![json!(false)]
        );
        assert_eq!(eval("Patient.gender.hasValue()", &p), vec![json!(true)]);
        assert_eq!(eval("Patient.name.hasValue()", &p), vec![json!(false)]);
        assert_eq!(eval("Patient.active = true", &p), vec![json!(true)]);
        assert_eq!(
            eval("Patient.gender = 'female' xor Patient.active", &p),
            vec![json!(true)]
        );
        assert_eq!(
            eval("Patient.active implies Patient.gender = 'male'", &p),
            vec![json!(true)]
        );
        assert!(eval("Patient.photo = 'x'", &p).is_empty());
        // The R4 `deceased` expression.
        let e = "Patient.deceased.exists() and Patient.deceased != false";
        assert_eq!(eval(e, &p), vec![json!(false)]);
        assert_eq!(
            eval(
                e,
                &json!({"resourceType": "Patient", "deceasedBoolean": true})
            ),
            vec![json!(true)]
        );
        assert_eq!(
            eval(
                e,
                &json!({"resourceType": "Patient", "deceasedDateTime": "2020-01-01"})
            ),
            vec![json!(true)]
        );
        assert_eq!(
            eval(e, &json!({"resourceType": "Patient"})),
            vec![json!(false)]
        );
    }

    #[test]
    fn extensions() {
        let p = patient();
        assert_eq!(
            eval(
                "Patient.extension('http://example.org/birthPlace').value",
                &p
            ),
            vec![json!("Lyon")]
        );
        assert_eq!(
            choice_types(
                "Patient.extension('http://example.org/birthPlace').value",
                &p
            ),
            vec![Some("String".to_string())]
        );
        assert_eq!(
            eval(
                "Patient.extension('http://example.org/race').value.as(Coding).code",
                &p
            ),
            vec![json!("2106-3")]
        );
        assert!(eval("Patient.extension('http://example.org/none').value", &p).is_empty());
        assert_eq!(
            eval("Patient.hasExtension('http://example.org/race')", &p),
            vec![json!(true)]
        );
        assert_eq!(
            eval("Patient.hasExtension('http://example.org/none')", &p),
            vec![json!(false)]
        );
        assert_eq!(
            eval(
                "Patient.extension.where(url = 'http://example.org/birthPlace').value",
                &p
            ),
            vec![json!("Lyon")]
        );
    }

    #[test]
    fn indexers_first_last_tail() {
        let p = patient();
        assert_eq!(eval("Patient.name[1].given", &p), vec![json!("Jim")]);
        assert_eq!(eval("Patient.name.given[1]", &p), vec![json!("James")]);
        assert!(eval("Patient.name[5]", &p).is_empty());
        assert_eq!(eval("Patient.name.given.first()", &p), vec![json!("Peter")]);
        assert_eq!(eval("Patient.name.given.last()", &p), vec![json!("Jim")]);
        assert_eq!(
            eval("Patient.name.given.tail()", &p),
            vec![json!("James"), json!("Jim")]
        );
        assert_eq!(
            eval("Patient.name.first().family", &p),
            vec![json!("Chalmers")]
        );
        let bundle = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Composition", "id": "c"}},
            {"resource": {"resourceType": "Patient", "id": "p"}}
        ]});
        assert_eq!(
            eval("Bundle.entry[0].resource", &bundle),
            vec![json!({"resourceType": "Composition", "id": "c"})]
        );
        assert_eq!(
            eval("Bundle.entry.resource.ofType(Patient).id", &bundle),
            vec![json!("p")]
        );
        assert_eq!(
            eval(
                "Bundle.entry.resource.where($this is Composition).id",
                &bundle
            ),
            vec![json!("c")]
        );
    }

    #[test]
    fn environment_and_comments() {
        let p = patient();
        assert_eq!(eval("%resource.gender", &p), vec![json!("male")]);
        assert_eq!(
            eval("Patient.name.where(%resource.gender = 'male').family", &p),
            vec![json!("Chalmers")]
        );
        assert_eq!(
            eval("Patient.gender // trailing comment", &p),
            vec![json!("male")]
        );
        assert_eq!(
            eval("Patient /* inline */ .gender", &p),
            vec![json!("male")]
        );
        assert_eq!(
            eval(
                "Patient.telecom.where(value = 'jim\\u0040example.org').system",
                &p
            ),
            vec![json!("email")]
        );
    }

    #[test]
    fn unsupported_constructs_are_compile_errors() {
        for (expr, needle) in [
            ("Patient.descendants()", "descendants"),
            ("Patient.link.other.resolve()", "resolve"),
            ("Patient.multipleBirth + 1", "+"),
            ("Patient.birthDate < @2020-01-01", "@"),
            ("Patient.birthDate > Patient.deceased", ">"),
            ("Patient.name.given contains 'x'", "contains"),
            ("Patient.name[Patient.x]", "indexers"),
            ("Patient.name.select(given)", "select"),
            ("'abc'", "literal"),
            ("Patient.name.where()", "where"),
            ("Patient.name.as()", "as"),
            ("Patient.extension(1)", "extension"),
            ("Patient.name.", "name"),
            ("Patient.name.where(use = 'x'", "unterminated"),
            ("Patient.name)", "unexpected"),
            ("Patient.name 'x'", "unexpected"),
            ("'unterminated", "unterminated"),
            ("%ucum", "%ucum"),
            ("-Patient.x", "unary"),
            ("Patient.x ~ 'y'", "~"),
            ("", "end"),
        ] {
            let err = Expr::compile(expr).expect_err(expr);
            assert!(err.contains(needle), "{expr}: {err}");
        }
        let deep = format!("{}Patient.id{}", "(".repeat(200), ")".repeat(200));
        assert!(Expr::compile(&deep).unwrap_err().contains("deeply"));
    }

    #[test]
    fn choice_type_table_is_sorted() {
        assert!(CHOICE_TYPES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn long_expressions_are_bounded() {
        let long = vec!["Patient.id"; 3000].join(" | ");
        assert!(Expr::compile(&long).unwrap_err().contains("too long"));
        let ok = vec!["Patient.id"; 100].join(" | ");
        assert_eq!(eval(&ok, &patient()), vec![json!("p1")]);
        let deep = vec!["Patient.id"; 1000].join(" | ");
        assert!(Expr::compile(&deep).unwrap_err().contains("deeply"));
        let chain = format!("Patient{}", ".a".repeat(120));
        assert!(Expr::compile(&chain).is_ok());
        let chain = format!("Patient{}", ".a".repeat(1500));
        assert!(Expr::compile(&chain).unwrap_err().contains("deeply"));
        let logic = vec!["Patient.active"; 126].join(" and ");
        assert_eq!(eval(&logic, &patient()), vec![json!(true)]);
    }

    #[test]
    fn large_unions_are_linear() {
        let items: Vec<Value> = (0..50_000)
            .map(|i| json!({"system": "s", "value": i.to_string()}))
            .collect();
        let p = json!({"resourceType": "Patient", "identifier": items});
        let e = Expr::compile(
            "Patient.identifier | Patient.identifier.where(value = '7') | Patient.id",
        )
        .unwrap();
        assert_eq!(e.evaluate(&p).len(), 50_000);
    }

    #[test]
    fn evaluation_on_odd_json_is_safe() {
        let e = Expr::compile("Patient.name.given | Resource.id").unwrap();
        for v in [
            json!(null),
            json!([1, 2]),
            json!("Patient"),
            json!({"resourceType": 5}),
            json!({"name": null}),
        ] {
            let _ = e.evaluate(&v);
        }
        let p = json!({"resourceType": "Patient", "name": [null, {"given": [null, "A"]}]});
        assert_eq!(eval("Patient.name.given", &p), vec![json!("A")]);
    }

    /// Every R4 SearchParameter expression, compiled: report the coverage and
    /// require all expressions of the core clinical types to compile.
    #[test]
    fn r4_search_parameter_expressions_compile() {
        let bundle: Value =
            serde_json::from_str(include_str!("../data/search-parameters-r4.json")).unwrap();
        let required = [
            "Patient",
            "Practitioner",
            "Organization",
            "Encounter",
            "Observation",
            "Condition",
            "MedicationRequest",
            "AllergyIntolerance",
            "Procedure",
            "CareTeam",
            "Consent",
            "Device",
            "Coverage",
            "Resource",
            "DomainResource",
        ];
        let (mut total, mut ok) = (0, 0);
        let mut failures = Vec::new();
        for entry in bundle["entry"].as_array().unwrap() {
            let r = &entry["resource"];
            let Some(expr) = r["expression"].as_str() else {
                continue;
            };
            total += 1;
            match Expr::compile(expr) {
                Ok(_) => ok += 1,
                Err(e) => {
                    let bases: Vec<&str> = r["base"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter_map(Value::as_str)
                        .collect();
                    assert!(
                        !bases.iter().any(|b| required.contains(b)),
                        "{} ({expr}) must compile: {e}",
                        r["id"]
                    );
                    failures.push(format!("{}: {e}", r["id"]));
                }
            }
        }
        println!("FHIRPath coverage: {ok}/{total} R4 search parameter expressions compile");
        for f in &failures {
            println!("  not compiled: {f}");
        }
        assert!(ok * 100 > total * 95, "coverage {ok}/{total} under 95%");
    }
}
