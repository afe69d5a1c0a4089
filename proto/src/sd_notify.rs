//! systemd's readiness protocol (`Type=notify`), shared by `mesh-manager` and `mesh-agent`:
//! one `READY=1` datagram to the socket named by `$NOTIFY_SOCKET`, a path or, with a leading
//! `@`, an abstract socket name. Without that variable (not started by systemd) it does nothing.

use std::io;
use std::os::unix::net::UnixDatagram;

/// The variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells systemd the service is ready. Returns whether a notification was sent.
pub fn ready() -> io::Result<bool> {
    notify(std::env::var_os(NOTIFY_SOCKET).as_deref(), "READY=1")
}

/// Sends `state` to `socket` (a `$NOTIFY_SOCKET` value); `None` or empty sends nothing.
pub fn notify(socket: Option<&std::ffi::OsStr>, state: &str) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let Some(name) = socket.filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = name.as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), name)?;
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::linux::net::SocketAddrExt;

    fn received(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_ready_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("sd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        assert!(notify(Some(path.as_os_str()), "READY=1").unwrap());
        assert_eq!(received(&sock), "READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sends_ready_to_an_abstract_socket() {
        let name = format!("meshnet-sd-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        let var = format!("@{name}");
        assert!(notify(Some(OsStr::new(&var)), "READY=1").unwrap());
        assert_eq!(received(&sock), "READY=1");
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        assert!(!notify(None, "READY=1").unwrap());
        assert!(!notify(Some(OsStr::new("")), "READY=1").unwrap());
    }

    #[test]
    fn a_missing_socket_is_an_error() {
        assert!(notify(Some(OsStr::new("/nonexistent/meshnet/notify")), "READY=1").is_err());
    }
}
