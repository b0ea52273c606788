//! What the end-to-end tests share: the namespace lab, clients run in its client namespace, and
//! TLS material for secure.lab made with openssl at test time.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false)
}

pub fn lab(args: &[&str]) -> std::process::Output {
    Command::new("bash").arg(repo().join("vagrant/lab.sh")).args(args).output().expect("lab.sh")
}

/// Runs CMD in the client namespace; (success, stdout).
pub fn client(cmd: &[&str]) -> (bool, String) {
    let o = Command::new("ip").args(["netns", "exec", "fl-client"]).args(cmd).output().expect("ip netns exec");
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned())
}

/// GET `path` from the appliance's admin endpoint (127.0.0.1:9100 in its namespace): the body,
/// whatever the status (`/readyz` explains itself in its 503), empty when nothing answers.
pub fn admin(path: &str) -> String {
    let o = Command::new("ip")
        .args(["netns", "exec", "fl-lb", "curl", "-s", &format!("http://127.0.0.1:9100{path}")])
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn curl(url: &str) -> Option<String> {
    let (ok, out) = client(&["curl", "-s", "-m", "3", "--fail", url]);
    ok.then(|| out.trim().to_string())
}

/// SIGTERM, then SIGKILL after 5 s.
pub fn stop(c: &mut Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) && !matches!(c.try_wait(), Ok(Some(_))) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Runs openssl in `dir`; panics with its output if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A CA for the test in dir/ca.key and dir/ca.crt.
pub fn make_ca(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=Fulcrum e2e CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
}

/// A certificate for secure.lab (organisation `org`) signed by dir/ca.*, as the manifest of the
/// kubernetes.io/tls Secret `secure-tls` in namespace `ns`.
pub fn tls_secret(dir: &Path, org: &str, ns: &str) -> String {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN=secure.lab/O={org}"),
            "-keyout",
            &format!("{org}.key"),
            "-out",
            &format!("{org}.csr"),
        ],
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:secure.lab\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{org}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            &format!("{org}.crt"),
        ],
    );
    let b64 = |f: &str| {
        let o = Command::new("base64").args(["-w0", f]).current_dir(dir).output().unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: secure-tls, namespace: {ns}}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64(&format!("{org}.crt")),
        b64(&format!("{org}.key"))
    )
}

/// The Secret and an Ingress of class fulcrum serving secure.lab over TLS from it, routed to
/// Service `web` (port `http`) of namespace `ns`; starts with a document separator.
pub fn secure_ingress(secret: &str, ns: &str) -> String {
    format!(
        "\n---\n{secret}---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: secure, namespace: {ns}}}\nspec:\n  ingressClassName: fulcrum\n  tls: [{{hosts: [secure.lab], secretName: secure-tls}}]\n  rules:\n  - host: secure.lab\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{name: http}}}}}}}}\n"
    )
}

/// The subject line of the certificate the Ingress address shows for SNI secure.lab.
pub fn tls_subject(ca: &Path) -> String {
    let (_, out) = client(&[
        "bash",
        "-c",
        &format!(
            "openssl s_client -connect 10.20.0.100:443 -servername secure.lab -CAfile {} </dev/null 2>/dev/null | grep -m1 '^subject='",
            ca.display()
        ),
    ]);
    out
}

/// A TLS connection to secure.lab held open: prints the certificate's organisation at once,
/// then, once `flag` exists, sends a request on the same connection and prints the status line.
pub fn hold_tls_connection(ca: &Path, flag: &Path) -> Child {
    Command::new("ip")
        .args(["netns", "exec", "fl-client", "python3", "-c"])
        .arg(format!(
            "import socket,ssl,time,os\nctx=ssl.create_default_context(cafile='{}')\ns=ctx.wrap_socket(socket.create_connection(('10.20.0.100',443)),server_hostname='secure.lab')\nprint(dict(x[0] for x in s.getpeercert()['subject'])['organizationName'],flush=True)\nt=time.time()\nwhile not os.path.exists('{}') and time.time()-t<20: time.sleep(0.1)\ns.sendall(b'GET / HTTP/1.1\\r\\nHost: secure.lab\\r\\n\\r\\n')\nprint(s.recv(200).split(b'\\r\\n')[0].decode(),flush=True)",
            ca.display(),
            flag.display()
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Which backends answered `n` new connections to `url` (failed attempts left out).
pub fn backends_seen(url: &str, n: usize) -> std::collections::BTreeSet<String> {
    (0..n).filter_map(|_| curl(url)).collect()
}

/// Rounds of `n` new connections to `url` until backend `name` answers one of them; fails with
/// `what` once `within` has passed. Returns how long it took.
pub fn wait_for_backend(url: &str, n: usize, name: &str, within: Duration, what: &str) -> Duration {
    let t = Instant::now();
    while !backends_seen(url, n).contains(name) {
        assert!(t.elapsed() < within, "{what}");
    }
    t.elapsed()
}
