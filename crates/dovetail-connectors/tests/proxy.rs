//! A record's send honours `HTTP_PROXY` and `NO_PROXY` as reqwest does:
//! through the proxy when one applies, straight to the partner when none
//! does. One test in its own binary, because it sets the environment.

mod common;

use common::{OK, recorder, send, sink};

#[test]
fn records_go_through_the_proxy_the_environment_names() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (proxy, through_proxy) = runtime.block_on(recorder(None));
    let (partner, at_partner) = runtime.block_on(recorder(None));
    // SAFETY: the only test in this binary, and no other thread has started:
    // nothing reads the environment while it changes.
    unsafe {
        std::env::set_var("HTTP_PROXY", format!("http://127.0.0.1:{proxy}"));
        std::env::set_var("NO_PROXY", "127.0.0.1");
    }
    runtime.block_on(async {
        // A partner the proxy applies to: the request goes to the proxy, in absolute form.
        let proxied = sink("http://partner.invalid:8080");
        assert_eq!(send(&proxied).await.0, OK);
        assert_eq!(*through_proxy.lock().unwrap(), ["POST http://partner.invalid:8080/orders HTTP/1.1"]);

        // A partner NO_PROXY exempts: straight to it.
        let direct = sink(&format!("http://127.0.0.1:{partner}"));
        assert_eq!(send(&direct).await.0, OK);
        assert_eq!(*at_partner.lock().unwrap(), ["POST /orders HTTP/1.1"]);
        assert_eq!(through_proxy.lock().unwrap().len(), 1, "the exempt partner's request went through the proxy");
    });
}
