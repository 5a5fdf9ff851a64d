//! The object stores the end-to-end tests replicate through: SeaweedFS
//! (S3) and Azurite (Azure Blob), real servers that `scripts/test.sh`
//! starts with `scripts/stores.sh start` and whose endpoint and
//! credentials it exports (`scripts/stores.sh env`) — tern and the tests
//! read the same `AWS_*` and `AZURE_STORAGE_*` variables an operator sets.

use std::path::Path;

use tern_store::object::Store;

/// Fails the test, saying how to start the servers, when they were not.
pub fn require_stores() {
    assert!(
        std::env::var_os("TERN_TEST_STORES").is_some(),
        "the object-store tests need SeaweedFS and Azurite: run `scripts/stores.sh install && scripts/stores.sh start && eval \"$(scripts/stores.sh env)\"` first (scripts/test.sh does)"
    );
}

/// A fresh location in the S3 bucket `bucket` (tern-test, tern-reverse),
/// unique to this test run.
pub fn s3(bucket: &str) -> String {
    require_stores();
    format!("s3://{bucket}/{}", unique())
}

/// A fresh location in the Azure container `container`.
pub fn azure(container: &str) -> String {
    require_stores();
    format!("az://{container}/{}", unique())
}

/// The store behind a location, for a test to read or damage objects
/// directly (as a hostile or broken store would).
pub fn open(location: &str) -> Store {
    Store::open(Path::new(location)).expect("open the store")
}

fn unique() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("t{}-{t}-{n}", std::process::id())
}

/// A SeaweedFS of the test's own (its own ports and data directory), for a
/// test that kills the store: the shared one stays up for the others.
pub struct PrivateSeaweed {
    dir: std::path::PathBuf,
    port: u16,
    /// The network namespace it runs in (the WAN's store host), if any.
    netns: Option<String>,
    child: Option<std::process::Child>,
}

impl PrivateSeaweed {
    /// Starts `weed mini` with its S3 endpoint on 127.0.0.1:`port` and
    /// its other listeners on `port` + 1..6 and + 10000..10006, bucket
    /// tern-test and tern-reverse, the shared instance's credentials.
    pub fn start(dir: &Path, port: u16) -> Self {
        Self::start_in(dir, port, None)
    }

    /// [`PrivateSeaweed::start`] inside the network namespace `netns`
    /// (listening on all its addresses), or in ours.
    pub fn start_in(dir: &Path, port: u16, netns: Option<String>) -> Self {
        require_stores();
        std::fs::create_dir_all(dir).expect("weed dir");
        let mut s = PrivateSeaweed { dir: dir.to_owned(), port, netns, child: None };
        s.restart();
        s
    }

    /// `AWS_ENDPOINT_URL` for this instance.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts it (again, on the same data) and waits until S3 answers.
    pub fn restart(&mut self) {
        let weed = std::env::var("TERN_TEST_WEED").unwrap_or_else(|_| "/opt/tern-weed/bin/weed".into());
        let config = self.dir.join("s3.json");
        let (key, secret) =
            (std::env::var("AWS_ACCESS_KEY_ID").unwrap(), std::env::var("AWS_SECRET_ACCESS_KEY").unwrap());
        std::fs::write(
            &config,
            format!(
                r#"{{"identities":[{{"name":"tern","credentials":[{{"accessKey":"{key}","secretKey":"{secret}"}}],"actions":["Admin","Read","Write","List"]}}]}}"#
            ),
        )
        .expect("s3 config");
        let p = |offset: u16| (self.port + offset).to_string();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("weed.log")).expect("log");
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, &weed]);
                c
            }
            None => std::process::Command::new(&weed),
        };
        let bind = if self.netns.is_some() { "-ip.bind=0.0.0.0" } else { "-ip.bind=127.0.0.1" };
        let child = command
            .arg("mini")
            .arg(format!("-dir={}", self.dir.display()))
            .args(["-ip=127.0.0.1", bind, "-admin.ui=false", "-webdav=false", "-bucket=tern-test,tern-reverse"])
            .arg(format!("-s3.config={}", config.display()))
            .args(["-s3.port", &p(0), "-s3.port.grpc", &p(10000), "-s3.port.iceberg=0", "-s3.port.lance=0"])
            .args(["-master.port", &p(1), "-master.port.grpc", &p(10001)])
            .args(["-volume.port", &p(2), "-volume.port.grpc", &p(10002)])
            .args(["-filer.port", &p(3), "-filer.port.grpc", &p(10003)])
            .args(["-admin.port", &p(4), "-admin.port.grpc", &p(10004)])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start weed mini");
        self.child = Some(child);
        if let Some(ns) = &self.netns {
            // Out of our reach: asked from inside its namespace.
            let probe = std::process::Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(crate::wan::wan_bin())
                .args(["probe", &self.endpoint(), "s3://tern-test/probe"])
                .output()
                .expect("run tern-wan probe");
            assert!(
                probe.status.success(),
                "SeaweedFS in {ns} did not come up ({}): {}",
                String::from_utf8_lossy(&probe.stderr),
                self.dir.join("weed.log").display()
            );
            return;
        }
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed().as_secs() < 60,
                "SeaweedFS did not start: {}",
                self.dir.join("weed.log").display()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        // The bucket is ready a moment after the port opens.
        let store = open_at(&self.endpoint(), "s3://tern-test/probe");
        while store.check().is_err() {
            assert!(started.elapsed().as_secs() < 60, "SeaweedFS's bucket did not come up");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// `kill -9`: the store gone mid-request.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateSeaweed {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `commands` in `weed shell` against the shared SeaweedFS (what
/// its operator would type: buckets, quotas); returns what it printed.
pub fn weed_shell(commands: &str) -> String {
    require_stores();
    let weed = std::env::var("TERN_TEST_WEED").unwrap_or_else(|_| "/opt/tern-weed/bin/weed".into());
    let mut shell = std::process::Command::new(weed)
        .args(["shell", "-master=127.0.0.1:9333"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start weed shell");
    use std::io::Write;
    shell.stdin.take().expect("stdin").write_all(format!("{commands}\n").as_bytes()).expect("weed shell input");
    let out = shell.wait_with_output().expect("weed shell");
    assert!(out.status.success(), "weed shell failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// [`open`] against another S3 endpoint than the environment's. (The
/// endpoint is read from the environment at open; tests run in parallel,
/// so it is passed by a variable the store reads first.)
pub fn open_at(endpoint: &str, location: &str) -> Store {
    Store::open_with_endpoint(Path::new(location), endpoint).expect("open the store")
}

/// [`open_at`] with these timeouts rather than the defaults.
pub fn open_at_with(endpoint: &str, location: &str, timeouts: tern_store::object::Timeouts) -> Store {
    Store::open_with(Path::new(location), Some(endpoint), timeouts).expect("open the store")
}
