//! Deterministic fault injection for tests: holding a thread at a `fail` point of the
//! gateway (built with its `failpoints` feature) until the test lets it go.

/// Hold the `n`-th thread (counting from 1) that reaches fault point `name` until the
/// returned sender is dropped; the receiver hears when it is reached.
pub fn hold_at(
    name: &str,
    n: usize,
) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
    let (reached_tx, reached) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let state = std::sync::Mutex::new((0usize, reached_tx, release_rx));
    fail::cfg_callback(name, move || {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += 1;
        if s.0 == n {
            let _ = s.1.send(());
            // Returns when the test drops `release`.
            let _ = s.2.recv();
        }
    })
    .expect("a valid fail point");
    (reached, release)
}
