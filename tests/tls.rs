//! TLS: clients to the proxy (`tls_cert_file`, `tls_key_file`, client
//! certificates with `tls_ca_cert_file`), the proxy to a TLS `redis-server`
//! (`rediss://`, `upstream_tls`, its CA and server name), and the
//! configuration errors that stop the proxy at start. Certificates are made
//! by each test (rcgen) in a scratch directory.

use std::process::Stdio;
use std::sync::Arc;

use cachefence::config::{Config, Settings, parse_settings};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use testkit::{
    FENCE_EVERY_KEY, Proxy, RawClient, RedisServer, ScratchDir, WAIT, cachefence_command, cmds, eventually,
    free_port,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// A scratch CA, a server certificate for `localhost` and `127.0.0.1`, and
/// a client certificate, all as PEM files in a scratch directory (removed
/// on drop).
struct Pki {
    dir: ScratchDir,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = ScratchDir::new(&format!("tls-{name}"));
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "cachefence test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        dir.write("ca.pem", ca.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::new(ca, ca_key);
        for (name, sans) in [
            ("server", vec!["localhost", "127.0.0.1"]),
            ("client", vec!["client"]),
        ] {
            let sans: Vec<String> = sans.into_iter().map(String::from).collect();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            dir.write(&format!("{name}.pem"), cert.pem());
            dir.write(&format!("{name}.key"), key.serialize_pem());
        }
        Pki { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.file_str(file)
    }

    /// The proxy's listener with this PKI's server certificate.
    fn listener_toml(&self) -> String {
        format!(
            "tls_cert_file = {:?}\ntls_key_file = {:?}\n",
            self.path("server.pem"),
            self.path("server.key")
        )
    }

    /// A `redis-server` with a plain port (for checks) and a TLS port that
    /// does not ask for client certificates.
    fn redis(&self) -> (RedisServer, u16) {
        let tls_port = free_port().to_string();
        let (cert, key, ca) = (
            self.path("server.pem"),
            self.path("server.key"),
            self.path("ca.pem"),
        );
        let server = RedisServer::start_with(&[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ]);
        (server, tls_port.parse().unwrap())
    }

    /// A rustls client trusting this PKI's CA.
    fn connector(&self) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(self.dir.file("ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

/// `redis-cli` with `args`, bounded by `WAIT`: (success, stdout, stderr).
async fn redis_cli(args: &[&str]) -> (bool, String, String) {
    let child = tokio::process::Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("running redis-cli (the tests need redis-tools: `apt-get install -y redis-tools`)");
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("redis-cli finished in time")
        .expect("redis-cli output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cli_over_tls_and_plain_clients_are_not_served() {
    let pki = Pki::new("listener");
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), &pki.listener_toml()).await;
    let port = proxy.addr.port().to_string();
    let ca = pki.path("ca.pem");
    let tls = ["--tls", "--cacert", &ca, "-h", "127.0.0.1", "-p", &port];

    let (ok, out, err) = redis_cli(&[&tls[..], &["SET", "k", "v"]].concat()).await;
    assert!(ok && out == "OK\n", "SET over TLS: {out:?} {err:?}");
    let (ok, out, err) = redis_cli(&[&tls[..], &["GET", "k"]].concat()).await;
    assert!(ok, "GET over TLS failed: {err}");
    assert_eq!(out, "v\n", "GET over TLS");
    // It went through to Redis.
    let mut direct = RawClient::connect(redis.addr()).await;
    assert_eq!(direct.call("GET k").await, "$1\r\nv\r\n");

    // A client speaking plain RESP to the TLS port gets no reply (at most a
    // TLS alert) and is closed; its command never reaches Redis.
    let errors_before = proxy.ctx.metrics.tls_handshake_errors.get();
    let mut plain = RawClient::connect(proxy.addr).await;
    plain.send(&cmds("SET plain leaked")).await;
    let (bytes, closed) = plain.read_to_close().await;
    assert!(closed, "a plain client on the TLS port was not closed");
    assert!(
        bytes.is_empty() || bytes[0] == 0x15,
        "a plain client got something other than a TLS alert: {}",
        testkit::escape(&bytes)
    );
    assert!(
        !bytes.windows(2).any(|w| w == b"OK"),
        "{}",
        testkit::escape(&bytes)
    );
    assert_eq!(direct.call("EXISTS plain").await, ":0\r\n");
    eventually("the failed handshake is counted", async || {
        proxy.ctx.metrics.tls_handshake_errors.get() > errors_before
    })
    .await;

    // redis-cli without --tls fails the same way.
    let (_, out, _) = redis_cli(&["-h", "127.0.0.1", "-p", &port, "PING"]).await;
    assert!(!out.contains("PONG"), "{out:?}");

    // A client that does not trust the proxy's CA refuses it.
    let other = Pki::new("listener-other");
    let other_ca = other.path("ca.pem");
    let (ok, out, _) = redis_cli(&[
        "--tls",
        "--cacert",
        &other_ca,
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "PING",
    ])
    .await;
    assert!(!(ok && out.contains("PONG")), "{out:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificates_are_required_with_tls_ca_cert_file() {
    let pki = Pki::new("mtls");
    let redis = RedisServer::start();
    let toml = format!(
        "{}tls_ca_cert_file = {:?}\n",
        pki.listener_toml(),
        pki.path("ca.pem")
    );
    let proxy = Proxy::start(&redis.addr(), &toml).await;
    let port = proxy.addr.port().to_string();
    let ca = pki.path("ca.pem");
    let tls = ["--tls", "--cacert", &ca, "-h", "127.0.0.1", "-p", &port];

    let (ok, out, err) = redis_cli(&[&tls[..], &["PING"]].concat()).await;
    assert!(
        !(ok && out.contains("PONG")),
        "served without a client certificate: {out:?} {err:?}"
    );

    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let (ok, out, err) = redis_cli(&[&tls[..], &["--cert", &cert, "--key", &key, "PING"]].concat()).await;
    assert!(
        ok && out == "PONG\n",
        "with a client certificate: {out:?} {err:?}"
    );

    // A certificate from another CA is refused.
    let other = Pki::new("mtls-other");
    let (cert, key) = (other.path("client.pem"), other.path("client.key"));
    let (ok, out, _) = redis_cli(&[&tls[..], &["--cert", &cert, "--key", &key, "PING"]].concat()).await;
    assert!(!(ok && out.contains("PONG")), "{out:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_tls_to_a_tls_redis_server() {
    let pki = Pki::new("upstream");
    let (redis, tls_port) = pki.redis();
    // The invalidator's own connection (double_delete) is TLS too.
    let toml = format!(
        "upstream = \"rediss://127.0.0.1:{tls_port}\"\nupstream_tls_ca_cert_file = {:?}\n\
         [[cache]]\npattern = \"*\"\non_write = \"write\"\ndouble_delete = \"200ms\"\n",
        pki.path("ca.pem")
    );
    let proxy = Proxy::start("unused:1", &toml).await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET k v").await, "+OK\r\n");
    assert_eq!(client.call("GET k").await, "$1\r\nv\r\n");
    let mut direct = RawClient::connect(redis.addr()).await;
    assert_eq!(direct.call("GET k").await, "$1\r\nv\r\n");

    // A fenced fill after a delete is removed again by the second delete,
    // which the invalidator sends on its own TLS connection.
    assert_eq!(client.call("DEL f").await, ":0\r\n");
    assert_eq!(client.call("GET f").await, "$-1\r\n");
    assert_eq!(client.call("SET f filled").await, "+OK\r\n");
    eventually("the second delete removed the fill", async || {
        direct.call("EXISTS f").await == ":0\r\n"
    })
    .await;
    let stats = client.call("CACHE.STATS").await;
    assert!(stats.contains("$19\r\nsecond_deletes_done\r\n:1\r\n"), "{stats}");
    proxy.shutdown().await;

    // `upstream_tls = true` with a host:port upstream, and the server name
    // given explicitly.
    let toml = format!(
        "upstream_tls = true\nupstream_tls_ca_cert_file = {:?}\nupstream_tls_server_name = \"localhost\"\n",
        pki.path("ca.pem")
    );
    let proxy = Proxy::start(&format!("127.0.0.1:{tls_port}"), &toml).await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("GET k").await, "$1\r\nv\r\n");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_certificates_are_verified() {
    let pki = Pki::new("verify");
    let (_redis, tls_port) = pki.redis();
    let upstream = format!("rediss://127.0.0.1:{tls_port}");
    // The default roots (webpki-roots) do not include the test CA; a wrong
    // name fails with the right CA.
    let wrong_name = format!(
        "upstream_tls_ca_cert_file = {:?}\nupstream_tls_server_name = \"redis.example.com\"\n",
        pki.path("ca.pem")
    );
    for toml in ["", wrong_name.as_str()] {
        let proxy = Proxy::start(&upstream, toml).await;
        let mut client = RawClient::connect(proxy.addr).await;
        let reply = client.call("PING").await;
        assert!(
            reply.starts_with("-ERR cachefence: upstream 127.0.0.1:")
                && reply.contains("TLS handshake failed"),
            "{toml:?}: {reply}"
        );
        proxy.shutdown().await;
    }
    // Plain TCP to the TLS port (upstream_tls forgotten): Redis' TLS
    // layer never answers as Redis would.
    let proxy = Proxy::start(&format!("127.0.0.1:{tls_port}"), FENCE_EVERY_KEY).await;
    let mut client = RawClient::connect(proxy.addr).await;
    let reply = client.call_within("PING", WAIT).await;
    assert!(
        reply
            .as_deref()
            .is_none_or(|r| r.starts_with("-ERR cachefence: upstream")),
        "{reply:?}"
    );
    proxy.shutdown().await;
}

/// Both sides TLS (the session's split TLS streams), a pipeline and a value
/// larger than the socket buffers: rustls is left holding records it could
/// not send yet, which the proxy must flush.
#[tokio::test(flavor = "multi_thread")]
async fn tls_on_both_sides_carries_large_values_and_pipelines() {
    let pki = Pki::new("both");
    let (redis, tls_port) = pki.redis();
    let toml = format!(
        "{}upstream_tls_ca_cert_file = {:?}\n",
        pki.listener_toml(),
        pki.path("ca.pem")
    );
    let proxy = Proxy::start(&format!("rediss://localhost:{tls_port}"), &toml).await;
    // A small receive buffer (no autotuning): the proxy's writes find the
    // socket full and rustls keeps what it could not send.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 << 10).unwrap();
    let tcp = tokio::time::timeout(WAIT, socket.connect(proxy.addr))
        .await
        .unwrap()
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut stream = tokio::time::timeout(WAIT, pki.connector().connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");

    let big: Vec<u8> = (0..4 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    let mut request = testkit::cmd(&[b"SET", b"big", &big]);
    for i in 0..1000 {
        request.extend_from_slice(&cmds(&format!("INCR n{}", i % 7)));
    }
    request.extend_from_slice(&cmds("GET big"));
    let mut expected = b"+OK\r\n".to_vec();
    for i in 0..1000 {
        expected.extend_from_slice(format!(":{}\r\n", i / 7 + 1).as_bytes());
    }
    expected.extend_from_slice(format!("${}\r\n", big.len()).as_bytes());
    expected.extend_from_slice(&big);
    expected.extend_from_slice(b"\r\n");

    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        wr.write_all(&request).await.unwrap();
        wr.flush().await.unwrap();
        wr
    });
    // A slow reader: the proxy's writes find the socket full.
    let mut got = vec![0u8; expected.len()];
    tokio::time::timeout(WAIT, async {
        for chunk in got.chunks_mut(16 << 10) {
            tokio::time::sleep(std::time::Duration::from_micros(500)).await;
            rd.read_exact(chunk).await.expect("reading the replies");
        }
    })
    .await
    .expect("all replies within the wait");
    assert!(got == expected, "replies differ from the expected ones");
    stream = rd.unsplit(writer.await.unwrap());
    stream.write_all(&cmds("QUIT")).await.unwrap();
    stream.flush().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
    assert_eq!(rest, b"+OK\r\n");

    let mut direct = RawClient::connect(redis.addr()).await;
    assert_eq!(direct.call("STRLEN big").await, format!(":{}\r\n", big.len()));
    proxy.shutdown().await;
}

fn resolve(toml: &str) -> Result<Config, String> {
    let settings: Settings = parse_settings(toml).expect("parses");
    Config::resolve(settings, None).map_err(|e| format!("{e:#}"))
}

#[test]
fn bad_certificate_settings_are_config_errors_naming_the_key() {
    let pki = Pki::new("config");
    let missing = pki.path("missing.pem");
    let (cert, key, ca) = (pki.path("server.pem"), pki.path("server.key"), pki.path("ca.pem"));
    let garbage = pki.path("garbage.pem");
    pki.dir.write(
        "garbage.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    let cases = [
        (
            format!("tls_cert_file = {missing:?}\ntls_key_file = {key:?}\n"),
            "tls_cert_file",
            Some(&missing),
        ),
        (
            format!("tls_cert_file = {cert:?}\ntls_key_file = {missing:?}\n"),
            "tls_key_file",
            Some(&missing),
        ),
        (
            format!("tls_cert_file = {garbage:?}\ntls_key_file = {key:?}\n"),
            "tls_cert_file",
            Some(&garbage),
        ),
        // A key file with no key in it, and a key that is not the certificate's.
        (
            format!("tls_cert_file = {cert:?}\ntls_key_file = {cert:?}\n"),
            "tls_key_file",
            Some(&cert),
        ),
        (
            format!(
                "tls_cert_file = {cert:?}\ntls_key_file = {:?}\n",
                pki.path("client.key")
            ),
            "tls_key_file",
            None,
        ),
        (format!("tls_cert_file = {cert:?}\n"), "tls_key_file", None),
        (format!("tls_key_file = {key:?}\n"), "tls_cert_file", None),
        (
            format!("tls_cert_file = {cert:?}\ntls_key_file = {key:?}\ntls_ca_cert_file = {missing:?}\n"),
            "tls_ca_cert_file",
            Some(&missing),
        ),
        (
            format!("upstream_tls = true\nupstream_tls_ca_cert_file = {missing:?}\n"),
            "upstream_tls_ca_cert_file",
            Some(&missing),
        ),
        (
            format!("upstream_tls_ca_cert_file = {ca:?}\n"),
            "upstream_tls_ca_cert_file",
            None,
        ),
        (
            "upstream = \"rediss://h:1\"\nupstream_tls_server_name = \"not a name\"\n".to_string(),
            "upstream_tls_server_name",
            None,
        ),
    ];
    for (toml, key, path) in cases {
        let error = resolve(&toml).expect_err(&toml);
        assert!(error.contains(&format!("key `{key}`")), "{toml}: {error}");
        if let Some(path) = path {
            assert!(error.contains(path.as_str()), "{toml}: {error}");
        }
    }
    // Valid: both sides, with client certificates.
    let ok = format!(
        "tls_cert_file = {cert:?}\ntls_key_file = {key:?}\ntls_ca_cert_file = {ca:?}\n\
         upstream = \"rediss://127.0.0.1:6390\"\nupstream_tls_ca_cert_file = {ca:?}\n"
    );
    let config = resolve(&ok).unwrap();
    assert!(config.tls.is_some() && config.upstream.tls.is_some());
    assert!(resolve("").unwrap().tls.is_none() && resolve("").unwrap().upstream.tls.is_none());

    // `--check` reports it, naming the key and the file.
    let out = cachefence_command()
        .args(["--check", "--tls-cert-file", &missing, "--tls-key-file", &key])
        .output()
        .expect("running cachefence --check");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("key `tls_cert_file`") && text.contains(&missing),
        "{text}"
    );
    let out = cachefence_command()
        .args(["--check", "--tls-cert-file", &cert, "--tls-key-file", &key])
        .output()
        .expect("running cachefence --check");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
