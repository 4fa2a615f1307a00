//! Test support for Dovetail.
//!
//! * [`partner`]: [`partner::Partner`], a local HTTP server that stands in for
//!   a remote partner API and misbehaves on cue (errors, `Retry-After`, slow
//!   answers, connections dropped before or after the effect happened), while
//!   recording every request and every committed effect so tests can assert
//!   that Dovetail never applies a record twice.
//! * [`free_port`]: a port number that was free a moment ago.

#![warn(missing_docs)]

pub mod partner;

/// Returns a TCP port on 127.0.0.1 that was free when this function ran.
///
/// It binds `127.0.0.1:0`, reads the port the OS picked and closes the
/// listener again. Another process may grab the port before the caller binds
/// it, so prefer binding port 0 directly (as [`partner::Partner::start`] does)
/// wherever the code under test allows it.
///
/// # Panics
///
/// Panics if no loopback port can be bound at all.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_port_is_bindable() {
        let port = super::free_port();
        assert_ne!(port, 0);
        // Normally still free; tolerate a rare race with another process.
        let _ = std::net::TcpListener::bind(("127.0.0.1", port));
    }
}
