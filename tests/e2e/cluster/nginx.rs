//! nginx as the one address in front of the replicas: round-robin over them, unbuffered both
//! ways (a blob streams through as the replica sends it), HTTP/1.1 with keep-alive to the
//! replicas, no body size limit. Everything it writes (pid, logs, temp files) stays in its
//! directory; run as `nginx -p DIR -c DIR/nginx.conf -e DIR/error.log -g 'daemon off;'`
//! (`-e` so that it never opens the compiled-in `/var/log/nginx/error.log`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::procs::{serve_on_free_port, Proc};

pub struct Nginx {
    pub port: u16,
    _proc: Proc,
}

impl Nginx {
    /// Starts nginx in `dir` in front of the replicas listening on `backends` (loopback
    /// ports), and waits until `GET /v2/` through it answers 200.
    pub async fn start(dir: &Path, backends: &[u16]) -> Nginx {
        std::fs::create_dir_all(dir.join("temp")).expect("create nginx dir");
        let servers: String = backends
            .iter()
            .map(|p| format!("    server 127.0.0.1:{p};\n"))
            .collect();
        let spawn = |port: u16| {
            let conf = format!(
                r#"# As root, nginx's workers would run as nobody; they need nothing of root here.
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 4096; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/temp/body;
  proxy_temp_path {d}/temp/proxy;
  fastcgi_temp_path {d}/temp/fastcgi;
  uwsgi_temp_path {d}/temp/uwsgi;
  scgi_temp_path {d}/temp/scgi;
  upstream replicas {{
{servers}    keepalive 32;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://replicas;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_buffering off;
      proxy_request_buffering off;
      client_max_body_size 0;
      proxy_read_timeout 300s;
      send_timeout 300s;
    }}
  }}
}}
"#,
                d = dir.display(),
            );
            let path = dir.join("nginx.conf");
            std::fs::write(&path, conf).expect("write nginx.conf");
            let mut cmd = Command::new("nginx");
            cmd.arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&path)
                .arg("-e")
                .arg(dir.join("error.log"))
                .args(["-g", "daemon off;"]);
            let log = dir.join("nginx.log");
            Proc::spawn("nginx", &mut cmd, &log, &log, Duration::from_secs(5))
        };
        let (port, proc) = serve_on_free_port("/v2/", 200, spawn).await;
        Nginx { port, _proc: proc }
    }

    /// `127.0.0.1:PORT`, as clients name the cluster.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}
