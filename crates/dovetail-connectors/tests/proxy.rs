//! A record's send honours `HTTP_PROXY` and `NO_PROXY` as reqwest does:
//! through the proxy when one applies, straight to the partner when none
//! does, with the same headers either way; a poller's page asks for JSON
//! alone. One test in its own binary, because it sets the environment.

mod common;

use common::{OK, header_values, recorder, request_lines, send, sink};
use dovetail_core::clock::Timestamp;

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
        assert_eq!(request_lines(&through_proxy), ["POST http://partner.invalid:8080/orders HTTP/1.1"]);

        // A partner NO_PROXY exempts: straight to it.
        let direct = sink(&format!("http://127.0.0.1:{partner}"));
        assert_eq!(send(&direct).await.0, OK);
        assert_eq!(request_lines(&at_partner), ["POST /orders HTTP/1.1"]);
        assert_eq!(through_proxy.lock().unwrap().len(), 1, "the exempt partner's request went through the proxy");

        // Both paths send the same headers, each once.
        let heads = [through_proxy.lock().unwrap()[0].clone(), at_partner.lock().unwrap()[0].clone()];
        for head in &heads {
            let one = |name: &str| {
                let values = header_values(head, name);
                assert_eq!(values.len(), 1, "{name} in {head}");
                values[0].clone()
            };
            assert_eq!(one("accept"), "*/*");
            assert!(one("user-agent").starts_with("dovetail/"), "{head}");
            assert_eq!(one("content-type"), "application/json");
            assert_eq!(one("content-length"), "2");
            assert_eq!(one("idempotency-key"), "dt1-test");
            assert_eq!(one("x-correlation-id"), "0af7651916cd43dd8448eb211c80319c");
            assert!(one("traceparent").starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{head}");
            one("host");
        }

        // A poller's page asks for JSON, and only for JSON.
        let page = direct.fetch(None, &[], "0af7651916cd43dd8448eb211c80319c", || Timestamp::from_millis(0)).await;
        assert_eq!(page.expect("the page").result.answer, OK);
        let head = at_partner.lock().unwrap()[1].clone();
        assert_eq!(header_values(&head, "accept"), ["application/json"], "{head}");
    });
}
