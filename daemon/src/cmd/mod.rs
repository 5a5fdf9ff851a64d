//! One module per subcommand: its arguments and what it does.

pub mod demo;
pub mod enable;
pub mod journal;
pub mod serve;
