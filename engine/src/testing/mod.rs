//! Test-only machinery, kept together: the seeded simulated I/O layer and
//! its crash journal ([`sim`]), and the entry points the fuzz targets and
//! their corpus-replay tests share ([`fuzz`]).
//!
//! Nothing here runs in production paths unless a test asks for it.

pub mod crash;
pub mod fuzz;
pub mod sim;
