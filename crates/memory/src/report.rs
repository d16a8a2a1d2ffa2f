//! Reporting errors the VMM survives: every vmcraft crate logs them (through the
//! `log` facade) with their whole chain of causes, so a log line says what failed
//! and why. It lives in this crate because every other crate builds on it.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its sources: `a: b: c`.
///
/// ```
/// use vmcraft_memory::report::ErrorChain;
/// use vmcraft_memory::layout::{LayoutError, MemoryLayout};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("cannot boot")]
/// struct BootError(#[source] LayoutError);
///
/// let e = BootError(MemoryLayout::x86_64(4096).unwrap_err());
/// assert_eq!(
///     ErrorChain(&e).to_string(),
///     "cannot boot: guest RAM of 4096 bytes is too small: at least 1048576 bytes are needed"
/// );
/// ```
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn every_source_follows_its_error_in_order() {
        let e = Layer(
            "outer",
            Some(Box::new(Layer(
                "middle",
                Some(Box::new(Layer("root", None))),
            ))),
        );
        assert_eq!(ErrorChain(&e).to_string(), "outer: middle: root");
        assert_eq!(format!("{:?}", ErrorChain(&e)), "outer: middle: root");
        assert_eq!(ErrorChain(&Layer("alone", None)).to_string(), "alone");
    }
}
