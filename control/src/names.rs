//! The one rule for every name a person chooses and control stores and
//! shows to others: display names, project, host, package and gateway
//! names. A name is trimmed, 1 to `max_chars` characters, and holds no
//! character that is invisible or changes how the text around it is
//! shown: bidirectional overrides and isolates (U+202A–U+202E,
//! U+2066–U+2069), direction marks (U+200E, U+200F, U+061C), zero-width
//! characters (U+200B–U+200D, U+FEFF), control characters. Such a
//! character lets one name read as another on an admin's page (a host
//! "gpu" U+202E "exe.txt" shows as "gputxt.exe"), or look empty.
//!
//! The rule goes by Unicode general category, so it covers the characters
//! nobody listed by hand: Cc (control), Cf (format: every bidi control
//! and zero-width character above, soft hyphens, tags), Zl and Zp (line
//! and paragraph separators), Co (private use, which shows differently on
//! every machine) and Cn (unassigned). Plus the Hangul fillers, letters
//! by category that render as nothing. Letters, marks (accents, combining
//! and variation selectors, so emoji keep their presentation), digits,
//! symbols and ordinary spaces are accepted in any script.

use icu_properties::props::GeneralCategory;
use icu_properties::CodePointMapData;

use crate::error::AppError;

/// What a name is called in messages, and the field that carries it.
pub struct NameRule {
    /// The request field the error names: `name`.
    pub field: &'static str,
    /// How a message starts when it talks about the name: "A project name".
    pub what: &'static str,
    /// What to say when it is empty: "Give the project a name."
    pub when_empty: &'static str,
    pub max_chars: usize,
}

impl NameRule {
    /// The trimmed name, or an error naming the field and saying what is
    /// wrong, down to the first refused character and where it is.
    pub fn check(&self, raw: &str) -> Result<String, AppError> {
        let name = raw.trim();
        if name.is_empty() {
            return Err(AppError::invalid(self.field, self.when_empty));
        }
        if name.chars().count() > self.max_chars {
            return Err(AppError::invalid(
                self.field,
                format!("{} has at most {} characters.", self.what, self.max_chars),
            ));
        }
        if let Some((position, c)) = first_refused(name) {
            return Err(AppError::invalid(
                self.field,
                format!(
                    "{} cannot hold invisible, control or text-direction characters; \
                     remove {} at character {position}.",
                    self.what,
                    describe(c)
                ),
            ));
        }
        Ok(name.to_owned())
    }
}

/// The first character `is_refused` refuses, with its 1-based position.
pub fn first_refused(text: &str) -> Option<(usize, char)> {
    text.chars()
        .enumerate()
        .find(|(_, c)| is_refused(*c))
        .map(|(i, c)| (i + 1, c))
}

/// True for a character no name may hold (see the module comment).
pub fn is_refused(c: char) -> bool {
    use GeneralCategory as Gc;
    let refused_category = matches!(
        CodePointMapData::<GeneralCategory>::new().get(c),
        Gc::Control
            | Gc::Format
            | Gc::LineSeparator
            | Gc::ParagraphSeparator
            | Gc::PrivateUse
            | Gc::Surrogate
            | Gc::Unassigned
    );
    refused_category || HANGUL_FILLERS.contains(&c)
}

/// Letters by category that render as nothing, so a name of them looks
/// empty.
const HANGUL_FILLERS: [char; 4] = ['\u{115F}', '\u{1160}', '\u{3164}', '\u{FFA0}'];

/// `U+202E (right-to-left override)` for the few a person may recognise,
/// `U+0007` for the rest. Never the character itself, which would do in
/// the message what it was refused for.
fn describe(c: char) -> String {
    let name = match c {
        '\u{202A}' => "left-to-right embedding",
        '\u{202B}' => "right-to-left embedding",
        '\u{202C}' => "pop directional formatting",
        '\u{202D}' => "left-to-right override",
        '\u{202E}' => "right-to-left override",
        '\u{2066}' => "left-to-right isolate",
        '\u{2067}' => "right-to-left isolate",
        '\u{2068}' => "first strong isolate",
        '\u{2069}' => "pop directional isolate",
        '\u{200E}' => "left-to-right mark",
        '\u{200F}' => "right-to-left mark",
        '\u{061C}' => "Arabic letter mark",
        '\u{200B}' => "zero width space",
        '\u{200C}' => "zero width non-joiner",
        '\u{200D}' => "zero width joiner",
        '\u{FEFF}' => "zero width no-break space",
        _ => return format!("U+{:04X}", u32::from(c)),
    };
    format!("U+{:04X} ({name})", u32::from(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: NameRule = NameRule {
        field: "name",
        what: "A project name",
        when_empty: "Give the project a name.",
        max_chars: 10,
    };

    #[test]
    fn names_in_any_script_with_accents_and_emoji_are_accepted() {
        for good in [
            "Zoë 李",
            "Ada Lovelace",
            "Łódź",
            "مريم",
            "שרה",
            "नमस्ते",
            "🚀 Launch",
            // U+2764 U+FE0F: a variation selector (a mark) picks the emoji look.
            "\u{2764}\u{FE0F} heart",
            // e + combining acute accent.
            "Rene\u{301}e",
            "a\u{00A0}b",
        ] {
            assert!(first_refused(good).is_none(), "{good:?} refused");
            let rule = NameRule {
                max_chars: 100,
                ..RULE
            };
            assert_eq!(rule.check(&format!("  {good} ")).unwrap(), good);
        }
    }

    #[test]
    fn invisible_control_and_direction_characters_are_refused() {
        let refused = [
            '\u{0}',
            '\u{7}',
            '\t',
            '\n',
            '\r',
            '\u{1B}',
            '\u{7F}',
            '\u{85}',
            '\u{9F}',
            // Bidi embeddings, overrides, isolates, marks.
            '\u{202A}',
            '\u{202B}',
            '\u{202C}',
            '\u{202D}',
            '\u{202E}',
            '\u{2066}',
            '\u{2067}',
            '\u{2068}',
            '\u{2069}',
            '\u{200E}',
            '\u{200F}',
            '\u{061C}',
            // Zero width, byte order mark, soft hyphen, word joiner, tags.
            '\u{200B}',
            '\u{200C}',
            '\u{200D}',
            '\u{FEFF}',
            '\u{00AD}',
            '\u{2060}',
            '\u{E0041}',
            // Line and paragraph separators, private use, unassigned.
            '\u{2028}',
            '\u{2029}',
            '\u{E000}',
            '\u{10FFFD}',
            '\u{0378}',
            // Hangul fillers.
            '\u{115F}',
            '\u{1160}',
            '\u{3164}',
            '\u{FFA0}',
        ];
        for c in refused {
            assert!(is_refused(c), "U+{:04X} accepted", u32::from(c));
            assert_eq!(first_refused(&format!("ab{c}c")), Some((3, c)));
        }
    }

    #[test]
    fn the_message_names_the_field_and_the_character_without_showing_it() {
        let rule = NameRule {
            max_chars: 100,
            ..RULE
        };
        let err = rule.check("gpu\u{202E}exe.txt").unwrap_err();
        assert_eq!(err.field(), Some("name"));
        let message = err.to_string();
        assert!(
            message.contains("U+202E (right-to-left override) at character 4"),
            "{message}"
        );
        assert!(
            message.starts_with("A project name cannot hold"),
            "{message}"
        );
        assert!(!message.contains('\u{202E}'));
    }

    #[test]
    fn empty_and_long_names_are_refused_after_trimming() {
        assert_eq!(
            RULE.check("   ").unwrap_err().to_string(),
            "Give the project a name."
        );
        assert!(RULE.check(&"é".repeat(10)).is_ok());
        let err = RULE.check(&"é".repeat(11)).unwrap_err().to_string();
        assert_eq!(err, "A project name has at most 10 characters.");
        // Surrounding Unicode spaces are trimmed, not refused.
        assert_eq!(RULE.check("\u{3000}Thesis\u{2003}").unwrap(), "Thesis");
    }
}
