//! SIGTERM (what `kill`, process managers and `bench pd` send) stops `serve` and `up`
//! cleanly: exit status 0, and every port they held is free again, `up`'s instances' too.
#![cfg(unix)]

mod common;

use common::{free_port_range, ready, serve, up_at};

fn assert_free(ports: &[u16]) {
    for &port in ports {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} still taken after exit"
        );
    }
}

#[tokio::test]
async fn sigterm_stops_serve() {
    let s = serve(&[], None);
    ready(&s).await;
    let st = s.terminate();
    assert!(st.success(), "serve exited with {st}");
    assert_free(&[s.port]);
}

#[tokio::test]
async fn sigterm_stops_up_and_its_instances() {
    let base = free_port_range(24);
    let up = up_at(base, &[]);
    ready(&up).await;
    let st = up.terminate();
    assert!(st.success(), "up exited with {st}");
    // Instances, side channel, the proxy's admin port (base + 20) and the instances'.
    assert_free(&[
        up.port,
        base,
        base + 1,
        base + 10,
        base + 20,
        base + 21,
        base + 22,
    ]);
}
