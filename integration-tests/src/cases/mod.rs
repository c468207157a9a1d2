//! Every conformance case, grouped by the contract's sections.

use crate::Case;

/// Every case of the suite.
pub fn all() -> Vec<Case> {
    vec![]
}
