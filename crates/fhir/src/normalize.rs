//! Text normalization for string search: case- and accent-insensitive.
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// Normalize for R4 string search: Unicode NFKD, combining marks removed,
/// lower-cased, runs of white space folded to one space, trimmed.
/// `"  Zoë  O'Brien "` → `"zoe o'brien"`.
pub fn search_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    // A space is only written once a non-space follows it: folds runs and trims.
    let mut pending_space = false;
    let mut push = |c: char, out: &mut String| {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
        } else {
            if pending_space {
                out.push(' ');
                pending_space = false;
            }
            if c.is_ascii() {
                out.push(c.to_ascii_lowercase());
            } else {
                out.extend(c.to_lowercase());
            }
        }
    };
    if s.is_ascii() {
        for c in s.chars() {
            push(c, &mut out);
        }
    } else {
        for c in s.nfkd() {
            if !is_combining_mark(c) {
                push(c, &mut out);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example() {
        assert_eq!(search_string("  Zoë  O'Brien "), "zoe o'brien");
    }

    #[test]
    fn accents_and_case_are_folded() {
        assert_eq!(search_string("JOSÉ"), "jose");
        assert_eq!(search_string("Müller"), "muller");
        assert_eq!(search_string("Ångström"), "angstrom");
        assert_eq!(search_string("Crème Brûlée"), "creme brulee");
        assert_eq!(search_string("Łukasz"), "łukasz"); // no decomposition for Ł
        assert_eq!(search_string("ÇA"), "ca");
        // Precomposed and decomposed forms meet.
        assert_eq!(search_string("e\u{301}"), search_string("\u{e9}"));
    }

    #[test]
    fn compatibility_forms_are_folded() {
        assert_eq!(search_string("ﬁsh"), "fish");
        assert_eq!(search_string("ＡＢＣ"), "abc");
        assert_eq!(search_string("x\u{00a0}y"), "x y");
    }

    #[test]
    fn white_space_is_folded_and_trimmed() {
        assert_eq!(search_string("\t a \n\n b  "), "a b");
        assert_eq!(search_string("   "), "");
        assert_eq!(search_string(""), "");
        assert_eq!(search_string("van der  Berg"), "van der berg");
    }

    #[test]
    fn prefixes_of_normalized_text_still_match() {
        assert!(search_string("Peters").starts_with(&search_string("PETÉ")));
    }
}
