//! External programs (mkfs, thin-provisioning-tools): found in fixed system directories, never
//! through `$PATH` or a shell, with their output kept in errors.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output};

use crate::error::{Error, ErrorKind, Result};

/// Directories searched for programs, in order. `$PATH` is not used, so a daemon started from a
/// strange environment still runs the system's tools.
const SEARCH_DIRS: [&str; 6] = [
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
    "/usr/local/sbin",
    "/usr/local/bin",
];

/// Every program thinstack runs, with the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// `mkfs.ext4` (e2fsprogs)
    MkfsExt4,
    /// `mkfs.xfs` (xfsprogs)
    MkfsXfs,
    /// `resize2fs` (e2fsprogs)
    Resize2fs,
    /// `xfs_growfs` (xfsprogs)
    XfsGrowfs,
    /// `thin_check` (thin-provisioning-tools)
    ThinCheck,
    /// `thin_dump` (thin-provisioning-tools)
    ThinDump,
    /// `thin_ls` (thin-provisioning-tools)
    ThinLs,
    /// `thin_delta` (thin-provisioning-tools)
    ThinDelta,
    /// `blkid` (util-linux)
    Blkid,
    /// `wipefs` (util-linux)
    Wipefs,
    /// `lvm` (lvm2), run with the command as its first argument (`lvm vgcreate ...`)
    Lvm,
    /// `rbd-nbd` (rbd-nbd): serves an RBD image as an nbd device
    RbdNbd,
    /// `systemd-run` (systemd): starts an rbd-nbd mapping in a scope of its own
    SystemdRun,
    /// `setsid` (util-linux): starts an rbd-nbd mapping in a session of its own
    Setsid,
}

impl Program {
    /// The executable's file name.
    pub fn name(self) -> &'static str {
        match self {
            Program::MkfsExt4 => "mkfs.ext4",
            Program::MkfsXfs => "mkfs.xfs",
            Program::Resize2fs => "resize2fs",
            Program::XfsGrowfs => "xfs_growfs",
            Program::ThinCheck => "thin_check",
            Program::ThinDump => "thin_dump",
            Program::ThinLs => "thin_ls",
            Program::ThinDelta => "thin_delta",
            Program::Blkid => "blkid",
            Program::Wipefs => "wipefs",
            Program::Lvm => "lvm",
            Program::RbdNbd => "rbd-nbd",
            Program::SystemdRun => "systemd-run",
            Program::Setsid => "setsid",
        }
    }

    /// The Debian package to install when the program is missing.
    pub fn package(self) -> &'static str {
        match self {
            Program::MkfsExt4 | Program::Resize2fs => "e2fsprogs",
            Program::MkfsXfs | Program::XfsGrowfs => "xfsprogs",
            Program::ThinCheck | Program::ThinDump | Program::ThinLs | Program::ThinDelta => {
                "thin-provisioning-tools"
            }
            Program::Blkid | Program::Wipefs | Program::Setsid => "util-linux",
            Program::Lvm => "lvm2",
            Program::RbdNbd => "rbd-nbd",
            Program::SystemdRun => "systemd",
        }
    }

    /// The program's full path.
    ///
    /// Returns an `Unsupported` error naming the package to install when it is not found.
    pub fn path(self) -> Result<PathBuf> {
        SEARCH_DIRS
            .iter()
            .map(|dir| PathBuf::from(dir).join(self.name()))
            .find(|path| path.is_file())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{} is not installed (looked in {}); install the {} package",
                        self.name(),
                        SEARCH_DIRS.join(", "),
                        self.package()
                    ),
                )
            })
    }
}

/// Run `program` with `args` and wait; a non-zero exit is an error holding the command line,
/// the exit status and what it printed on stderr.
pub fn run<I, S>(program: Program, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with_env(program, args, &[])
}

/// [`run`] with extra environment variables.
pub fn run_with_env<I, S>(program: Program, args: I, env: &[(&str, &str)]) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(program.path()?);
    command.args(args).envs(env.iter().copied());
    let line = command_line(&command);
    tracing::debug!(command = %line, "running");
    let output = command
        .output()
        .map_err(|e| Error::io(format!("starting `{line}`"), e))?;
    if !output.status.success() {
        return Err(Error::new(
            ErrorKind::Command,
            format!(
                "`{line}` failed ({}): {}",
                output.status,
                last_lines(&output.stderr, &output.stdout)
            ),
        ));
    }
    Ok(output)
}

/// The command as a person would type it, for messages (never passed to a shell).
fn command_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last few lines a failed program printed: stderr, or stdout when stderr is empty.
fn last_lines(stderr: &[u8], stdout: &[u8]) -> String {
    let text = if stderr.iter().all(u8::is_ascii_whitespace) {
        String::from_utf8_lossy(stdout)
    } else {
        String::from_utf8_lossy(stderr)
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(5)..];
    if tail.is_empty() {
        "it printed nothing".to_string()
    } else {
        tail.join(" / ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_keeps_the_last_lines_of_stderr() {
        let text = last_lines(b"one\ntwo\n\nthree\nfour\nfive\nsix\n", b"");
        assert_eq!(text, "two / three / four / five / six");
        assert_eq!(last_lines(b"  \n", b"out\n"), "out");
        assert_eq!(last_lines(b"", b""), "it printed nothing");
    }

    #[test]
    fn a_failing_program_reports_its_command_line() {
        // blkid (util-linux, on every Debian machine) exits 2 for a path that is not a device.
        let err = run(Program::Blkid, ["/nonexistent-thinstack-test"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Command);
        assert!(
            err.to_string()
                .contains("blkid /nonexistent-thinstack-test"),
            "{err}"
        );
    }
}
