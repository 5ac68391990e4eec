//! Circuit relay on loopback: a relay over its reservation limit refuses
//! with circuit relay v2's own status code and keeps serving the node it
//! holds a reservation for; a peer that knows only the circuit address
//! reaches that node through the relay.

use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, StreamProtocol};
use troop_node::network::{self, NetConfig, NetworkHandle, RelayLimits, is_relayed};

const ECHO: StreamProtocol = StreamProtocol::new("/troop/test-echo/1");

fn node() -> NetConfig {
    let mut c = NetConfig::new(troop_protocol::identity::generate());
    c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    c.dht = false;
    c.gossip = false;
    c
}

async fn poll<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn circuit_addr(n: &NetworkHandle) -> Option<Multiaddr> {
    n.listen_addrs().into_iter().find(is_relayed)
}

/// `node` answers each echo stream with the 5 bytes it was sent.
fn serve_echo(node: &NetworkHandle) {
    let mut incoming = node
        .stream_control()
        .accept(ECHO)
        .expect("accept the echo protocol");
    tokio::spawn(async move {
        while let Some((_, mut s)) = incoming.next().await {
            let mut buf = [0u8; 5];
            if s.read_exact(&mut buf).await.is_ok() {
                let _ = s.write_all(&buf).await;
                let _ = s.close().await;
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_relay_refuses_the_next_reservation_and_keeps_serving() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut rc = node();
    rc.relay_server = Some(RelayLimits {
        max_reservations: 1,
        ..RelayLimits::default()
    });
    rc.relay_always = true;
    let (relay, _relay_events) = network::spawn(rc).await.expect("relay");
    let relay_addr = relay.listen_addrs()[0].clone();

    // Two nodes ask the same relay (given with --relay) for a reservation.
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = node();
        c.relays = vec![relay_addr.clone()];
        let (net, events) = network::spawn(c).await.expect("client");
        clients.push((net, events));
    }
    let holder = poll(
        "one reservation granted and one refused",
        Duration::from_secs(30),
        async || {
            let st = relay.status().await;
            let mut holders = Vec::new();
            for (c, _) in &clients {
                if !c.status().await.relay_reservations.is_empty() {
                    holders.push(c.clone());
                }
            }
            (st.relay_refused >= 1 && holders.len() == 1 && st.relay_clients == 1)
                .then(|| holders.remove(0))
        },
    )
    .await;
    let circuit = poll(
        "the holder's circuit address",
        Duration::from_secs(10),
        async || circuit_addr(&holder),
    )
    .await;
    assert_eq!(network::peer_of(&circuit), Some(holder.peer_id));

    // The holder answers an echo stream; a third node that knows only the
    // circuit address reaches it through the relay.
    serve_echo(&holder);
    let (caller, _caller_events) = network::spawn(node()).await.expect("caller");
    caller.dial(relay_addr.clone()).await;
    caller.add_address(holder.peer_id, circuit.clone()).await;
    poll(
        "the caller to reach the relay",
        Duration::from_secs(10),
        async || (caller.path(&relay.peer_id) == network::Path::Direct).then_some(()),
    )
    .await;
    // The circuit address reaches the swarm as a command of its own: until
    // it has, a dial finds "no addresses"; retry until a deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut s = loop {
        let opened = tokio::time::timeout_at(
            deadline,
            caller.stream_control().open_stream(holder.peer_id, ECHO),
        )
        .await
        .expect("opening the stream timed out");
        match opened {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("no stream yet ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("a stream through the relay: {e:?}"),
        }
    };
    s.write_all(b"hello").await.expect("write");
    let mut back = [0u8; 5];
    s.read_exact(&mut back).await.expect("read");
    assert_eq!(&back, b"hello");
    assert_eq!(relay.status().await.relay_clients, 1);
}

/// A node over its peer limit closes idle connections, but not the one to
/// a relay that carries its circuit to a peer: that would end the circuit
/// and whatever stream runs on it. The caller trims everything it may
/// (limit 0, no grace): a plain peer's connection goes, the relay's stays,
/// and a stream opened through the circuit before the trim still echoes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_keeps_the_relay_under_a_circuit_in_use() {
    let mut rc = node();
    rc.relay_server = Some(RelayLimits::default());
    rc.relay_always = true;
    let (relay, _relay_events) = network::spawn(rc).await.expect("relay");
    let relay_addr = relay.listen_addrs()[0].clone();
    let mut hc = node();
    hc.relays = vec![relay_addr.clone()];
    let (holder, _holder_events) = network::spawn(hc).await.expect("holder");
    let circuit = poll(
        "the holder's circuit address",
        Duration::from_secs(30),
        async || circuit_addr(&holder),
    )
    .await;
    serve_echo(&holder);
    let mut cc = node();
    // An address that is not a LAN one: the caller does not take a
    // reservation of its own (that relay would be kept for it).
    cc.listen.push(
        format!("/memory/{}", 90_000_000 + u64::from(rand::random::<u16>()))
            .parse()
            .expect("memory addr"),
    );
    cc.peers_high = 0;
    cc.peers_low = 0;
    // Long enough for the circuit to open over a fresh relay connection.
    cc.peers_grace = Duration::from_secs(5);
    let (caller, _caller_events) = network::spawn(cc).await.expect("caller");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut s = loop {
        // Until a circuit runs through it, the relay's connection is one
        // the caller may trim (after the grace): dial it again each try.
        caller.dial(relay_addr.clone()).await;
        caller.add_address(holder.peer_id, circuit.clone()).await;
        match caller
            .stream_control()
            .open_stream(holder.peer_id, ECHO)
            .await
        {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "a stream through the relay: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(caller.path(&holder.peer_id), network::Path::Relayed);
    assert!(
        caller.status().await.relay_reservations.is_empty(),
        "the caller holds no reservation"
    );
    // A plain peer connects to the caller; the trim closes it (so a trim
    // has run).
    let (plain, _plain_events) = network::spawn(node()).await.expect("plain");
    plain.dial(caller.listen_addrs()[0].clone()).await;
    let seen = |peer: libp2p::PeerId| {
        let caller = caller.clone();
        async move {
            caller
                .status()
                .await
                .connected_peers
                .contains(&peer.to_string())
        }
    };
    poll(
        "the plain peer connected",
        Duration::from_secs(10),
        async || seen(plain.peer_id).await.then_some(()),
    )
    .await;
    poll(
        "the plain peer trimmed",
        Duration::from_secs(30),
        async || (!seen(plain.peer_id).await).then_some(()),
    )
    .await;
    assert!(
        seen(relay.peer_id).await,
        "the relay under the circuit stays connected"
    );
    s.write_all(b"hello")
        .await
        .expect("write through the circuit");
    let mut back = [0u8; 5];
    s.read_exact(&mut back)
        .await
        .expect("read through the circuit");
    assert_eq!(&back, b"hello");
}

/// A second relay on a port the first one listens on refuses to start
/// ("address already in use", as every other role says) instead of sharing
/// the port through libp2p's SO_REUSEPORT and splitting its peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_on_a_taken_port_refuses_to_start() {
    let mut first = node();
    first.relay_server = Some(RelayLimits::default());
    first.relay_always = true;
    let (a, _events) = network::spawn(first).await.expect("the first relay");
    let taken = a
        .listen_addrs()
        .into_iter()
        .find(|addr| !is_relayed(addr))
        .expect("a TCP address");
    let mut second = node();
    second.relay_server = Some(RelayLimits::default());
    second.relay_always = true;
    second.listen = vec![taken.clone()];
    let err = match network::spawn(second).await {
        Ok(_) => panic!("a second relay shares {taken}"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("address already in use"), "{err}");
    a.shutdown();
}
