//! Everything that touches the host: device-mapper, loop devices, filesystems, programs.

pub mod cmd;
pub mod dm;
pub mod fs;
pub mod loopdev;
pub mod thin_tools;
