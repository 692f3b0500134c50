//! Telling the service manager how the gateway is doing: systemd's notification protocol.
//!
//! Under a `Type=notify` unit systemd passes a datagram socket in `NOTIFY_SOCKET` and, with
//! `WatchdogSec=`, the watchdog period in `WATCHDOG_USEC` (and the process it is meant for in
//! `WATCHDOG_PID`). The gateway says `READY=1` once it serves (models loaded), `RELOADING=1`
//! and `READY=1` around a reload, `STOPPING=1` when it drains, a human-readable `STATUS=`
//! with each, and `WATCHDOG=1` at half the watchdog period while its runtime is alive, so that
//! systemd restarts a gateway that hangs instead of one that merely exits.
//!
//! Without `NOTIFY_SOCKET` (a terminal, a container, a test) every call does nothing. Reading
//! the environment ([`ServiceManager::from_environment`]) is split from the pure parsing and
//! formatting below, which the tests drive directly.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// The longest `STATUS=` text sent, in bytes; longer texts are cut at a character boundary.
const STATUS_BYTES_MAX: usize = 512;

/// What the gateway tells the service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Start-up finished: the gateway serves (`READY=1`).
    Ready,
    /// A configuration reload began; `Ready` follows when it is done (`RELOADING=1`).
    Reloading,
    /// Draining before exit (`STOPPING=1`).
    Stopping,
    /// The gateway is alive (`WATCHDOG=1`).
    Watchdog,
    /// One line for `systemctl status` (`STATUS=`).
    Status(String),
}

/// A problem with what the service manager passed in the environment.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET `{0}` is neither an absolute path nor an abstract name (`@name`)")]
    Socket(String),
    #[error("WATCHDOG_USEC `{0}` is not a positive number of microseconds")]
    WatchdogPeriod(String),
}

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddress {
    Path(PathBuf),
    /// A Linux abstract socket name (given as `@name`).
    Abstract(Vec<u8>),
}

/// The service manager, as far as the environment names one.
#[derive(Debug)]
pub struct ServiceManager {
    target: Option<(UnixDatagram, NotifyAddress)>,
    watchdog_period: Option<Duration>,
}

impl ServiceManager {
    /// A manager that hears nothing: no socket, no watchdog.
    pub fn none() -> ServiceManager {
        ServiceManager {
            target: None,
            watchdog_period: None,
        }
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_environment() -> Result<ServiceManager, NotifyError> {
        let variable = |name: &str| std::env::var(name).ok();
        let address = parse_notify_socket(variable("NOTIFY_SOCKET").as_deref())?;
        let watchdog_period = parse_watchdog(
            variable("WATCHDOG_USEC").as_deref(),
            variable("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )?;
        let target = match address {
            Some(address) => {
                let socket = UnixDatagram::unbound().map_err(|error| {
                    NotifyError::Socket(format!("cannot create a datagram socket: {error}"))
                })?;
                Some((socket, address))
            }
            None => None,
        };
        Ok(ServiceManager {
            // A watchdog without a socket to ping cannot be served.
            watchdog_period: watchdog_period.filter(|_| target.is_some()),
            target,
        })
    }

    /// Whether a service manager listens.
    pub fn is_listening(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send [`Notice::Watchdog`]: half the period systemd enforces.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog_period.map(|period| period / 2)
    }

    /// Sends `notices` as one datagram. Does nothing when no manager listens.
    pub fn notify(&self, notices: &[Notice]) -> io::Result<()> {
        let Some((socket, address)) = &self.target else {
            return Ok(());
        };
        let message = format_notices(notices);
        match address {
            NotifyAddress::Path(path) => socket.send_to(message.as_bytes(), path)?,
            NotifyAddress::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message.as_bytes(), &address)?
            }
        };
        Ok(())
    }
}

/// Parses `NOTIFY_SOCKET`: unset or empty means no manager.
pub fn parse_notify_socket(value: Option<&str>) -> Result<Option<NotifyAddress>, NotifyError> {
    match value {
        None | Some("") => Ok(None),
        Some(path) if path.starts_with('/') => Ok(Some(NotifyAddress::Path(PathBuf::from(path)))),
        Some(name) if name.len() > 1 && name.starts_with('@') => {
            Ok(Some(NotifyAddress::Abstract(name.as_bytes()[1..].to_vec())))
        }
        Some(other) => Err(NotifyError::Socket(other.to_owned())),
    }
}

/// Parses `WATCHDOG_USEC` and `WATCHDOG_PID`: the period, when the watchdog is meant for the
/// process `own_pid` (a `WATCHDOG_PID` naming another process, such as a parent shell, means
/// the watchdog is not ours).
pub fn parse_watchdog(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec.filter(|usec| !usec.is_empty()) else {
        return Ok(None);
    };
    if let Some(pid) = pid.filter(|pid| !pid.is_empty())
        && pid.parse::<u32>().ok() != Some(own_pid)
    {
        return Ok(None);
    }
    match usec.parse::<u64>() {
        Ok(micros) if micros > 0 => Ok(Some(Duration::from_micros(micros))),
        _ => Err(NotifyError::WatchdogPeriod(usec.to_owned())),
    }
}

/// The datagram for `notices`: one `KEY=VALUE` line each.
pub fn format_notices(notices: &[Notice]) -> String {
    let mut message = String::new();
    for notice in notices {
        match notice {
            Notice::Ready => message.push_str("READY=1\n"),
            Notice::Reloading => message.push_str("RELOADING=1\n"),
            Notice::Stopping => message.push_str("STOPPING=1\n"),
            Notice::Watchdog => message.push_str("WATCHDOG=1\n"),
            Notice::Status(text) => {
                message.push_str("STATUS=");
                // One line: a newline would start another assignment.
                let line: String = text
                    .chars()
                    .map(|character| if character == '\n' { ' ' } else { character })
                    .collect();
                message.push_str(cut_at_char_boundary(&line, STATUS_BYTES_MAX));
                message.push('\n');
            }
        }
    }
    message
}

fn cut_at_char_boundary(text: &str, bytes_max: usize) -> &str {
    if text.len() <= bytes_max {
        return text;
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests;
