//! The `pagestream` command line over `https://` and `results --follow` on
//! a document that fails (issue #22, finding 7): the real pipeline behind a
//! real TLS server (rustls, a certificate of a private CA made with the
//! `openssl` command), results in a real S3 server (moto).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagestream_e2e::procs::bin_dir;
use pagestream_e2e::{corpus, read_json, repo_root, Harness, MotoServer};
use tokio_rustls::rustls;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("the openssl command");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A private CA and a server certificate it signed for `localhost` and
/// `127.0.0.1`: (CA PEM, certificate PEM, key PEM).
fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=pagestream test CA", "-keyout", "ca.key"];
    ca.extend(ec);
    ca.extend(["-out", "ca.pem", "-addext", "basicConstraints=critical,CA:TRUE"]);
    ca.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-new", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr"];
    csr.extend(ec);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
    (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"))
}

/// A TLS server on a free port that forwards each connection to `to` (the
/// API over plain HTTP), as a load balancer or ingress would; its port.
async fn tls_front(cert: &Path, key: &Path, to: String) -> u16 {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).unwrap().collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, to) = (acceptor.clone(), to.clone());
            tokio::spawn(async move {
                // A client that refuses our certificate ends the handshake.
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut api) = tokio::net::TcpStream::connect(&to).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut api).await;
            });
        }
    });
    port
}

/// Runs the CLI (without the caller's PAGESTREAM_* variables), killing it
/// after `within`: (exit code, stdout, stderr, seconds), code `None` when
/// it had to be killed.
async fn cli(env: &[(&str, &str)], args: &[&str], within: Duration) -> (Option<i32>, String, String, f64) {
    let mut cmd = tokio::process::Command::new(bin_dir().join("pagestream"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PAGESTREAM_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).envs(env.iter().copied()).stdin(Stdio::null()).kill_on_drop(true);
    let started = Instant::now();
    let out = tokio::time::timeout(within, cmd.output()).await;
    let secs = started.elapsed().as_secs_f64();
    match out {
        Ok(out) => {
            let out = out.unwrap();
            let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            (out.status.code(), s(&out.stdout), s(&out.stderr), secs)
        }
        Err(_) => (None, String::new(), String::new(), secs),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_speaks_https_and_follow_ends_with_the_reason_of_a_failure() {
    let moto = MotoServer::start().unwrap();
    let moto_port = moto.port;
    let (h, _) = Harness::start_s3(&moto, "tls-results", |c| c.nats.max_deliver = 3).await.unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(certs.path());
    let api = h.pipeline.base_url().trim_start_matches("http://").to_string();
    let port = tls_front(&cert, &key, api).await;
    let url = format!("https://localhost:{port}");
    let ca = ca.display().to_string();
    let with_ca = [("PAGESTREAM_URL", url.as_str()), ("PAGESTREAM_CA_CERT", ca.as_str())];
    let minute = Duration::from_secs(60);

    // Without the private CA: refused, and the reason says why.
    let (code, out, err, _) = cli(&[("PAGESTREAM_URL", &url)], &["models"], minute).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // With it (--ca-cert): submit and watch a real PDF to its end.
    let sample = repo_root().join("samples/c03-29.pdf");
    let (code, out, err, _) = cli(
        &[("PAGESTREAM_URL", &url)],
        &["submit", "--watch", "--ca-cert", &ca, sample.to_str().unwrap()],
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    let id = out.split_whitespace().next().unwrap().to_string();
    assert!(err.contains("completed"), "{err}");
    // PAGESTREAM_CA_CERT: status, and the results downloaded through the
    // API's presigned links to the S3 server.
    let (code, out, err, _) = cli(&with_ca, &["status", &id], minute).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("completed"), "{out}");
    let dl = tempfile::tempdir().unwrap();
    let (code, out, err, _) = cli(&with_ca, &["results", &id, "--download", dl.path().to_str().unwrap()], minute).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let manifest: serde_json::Value = read_json(&dl.path().join(&id).join("manifest.json"));
    assert_eq!(manifest["doc_id"], id.as_str());
    let (code, _, err, _) = cli(&with_ca, &["results", &id, "--follow"], minute).await;
    assert_eq!(code, Some(0), "{err}");

    // A document that failed (wrong password: a `failed` manifest):
    // `results --follow` ends non-zero with the reason.
    let locked = corpus("enc_aes256_pw-asdfzxcv.pdf");
    let (code, out, err, _) = cli(&with_ca, &["submit", locked.to_str().unwrap()], minute).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let locked_id = out.split_whitespace().next().unwrap().to_string();
    let (code, out, err, secs) = cli(&with_ca, &["results", &locked_id, "--follow"], minute).await;
    println!("results --follow of a failed document: exit {code:?} after {secs:.1} s: {}", err.trim());
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("failed") && err.contains("pdf_password"), "{err}");

    // The result store gone: the document ends `failed`,
    // `manifest_unwritten`, with no manifest. `results --follow` used to
    // poll forever; now it ends with the reason.
    drop(moto);
    let blank = corpus("stress_blank-no-content.pdf");
    let (code, out, err, _) = cli(&with_ca, &["submit", blank.to_str().unwrap()], minute).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let lost_id = out.split_whitespace().next().unwrap().to_string();
    let (code, out, err, secs) = cli(&with_ca, &["results", &lost_id, "--follow"], Duration::from_secs(300)).await;
    println!("results --follow of a document without a manifest: exit {code:?} after {secs:.1} s: {}", err.trim());
    assert_eq!(code, Some(1), "still polling after 300 s (killed), or: {out}{err}");
    assert!(err.contains("manifest_unwritten"), "{err}");
    // The store back (empty: the manifest was never written): the results
    // answer `complete: false` for a document that ended; the same.
    let moto = MotoServer::start_on(moto_port).unwrap();
    moto.bucket("tls-results").await.unwrap();
    let (code, out, err, secs) = cli(&with_ca, &["results", &lost_id, "--follow"], minute).await;
    println!("... with the store back: exit {code:?} after {secs:.1} s: {}", err.trim());
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("manifest_unwritten"), "{err}");
    h.stop().await.unwrap();
}
