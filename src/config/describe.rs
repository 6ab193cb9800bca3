//! What `streamgate -t` prints: the listeners (each certificate's names and expiry), the
//! services (endpoint source, balancing, retries, TLS, affinity, SSE settings), warnings,
//! the grace period, the middleware instances and the route table in precedence order.

use super::Config;

impl Config {
    /// A readable summary of what this config serves, for `streamgate -t`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        out.push_str("listen:\n");
        for listener in &self.listeners {
            out.push_str(&format!("  {listener}\n"));
            let Some(tls) = self.tls.get(&listener.addr) else {
                continue;
            };
            out.push_str(&format!("    min TLS version {}\n", tls.min_version));
            for (i, cert) in tls.certs.iter().enumerate() {
                let hosts: Vec<String> = cert.hosts.iter().map(|h| h.to_string()).collect();
                out.push_str(&format!(
                    "    {}{}\n      names: {}\n      expires: {}\n      chosen for: {}\n",
                    cert.cert_path.display(),
                    if i == 0 { " (default)" } else { "" },
                    cert.names.join(", "),
                    cert.expiry(),
                    if hosts.is_empty() {
                        "-".to_string()
                    } else {
                        hosts.join(", ")
                    },
                ));
            }
        }
        if let Some(admin) = &self.admin {
            out.push_str(&format!(
                "admin: {}, {}{}\n",
                admin.listen,
                admin.token_source,
                if admin.open_probes && admin.token.is_some() {
                    ", /healthz and /readyz open"
                } else {
                    ""
                }
            ));
        }
        if let Some(demo) = self.demo {
            out.push_str(&format!("demo origin: {demo}\n"));
        }
        out.push_str("services:\n");
        for service in self.services.values() {
            out.push_str(&format!("  {:<20} {}\n", service.name, service.url));
            out.push_str(&format!(
                "  {:<20} endpoints: {}, {}{}\n",
                "",
                service.discovery.as_deref().unwrap_or("the URL"),
                service.endpoints.algorithm().as_str(),
                if service.retries > 0 {
                    format!(", {} retries", service.retries)
                } else {
                    String::new()
                }
            ));
            if service.preconnect > 0 {
                out.push_str(&format!(
                    "  {:<20} preconnect: {} spare connections per endpoint and worker\n",
                    "", service.preconnect
                ));
            }
            if let Some(tls) = &service.tls {
                out.push_str(&format!("  {:<20} tls: {tls}\n", ""));
            }
            if let Some(affinity) = &service.affinity {
                out.push_str(&format!("  {:<20} affinity: {affinity}\n", ""));
            }
            out.push_str(&format!("  {:<20} sse: {}\n", "", service.sse));
        }
        for warning in self.warnings() {
            out.push_str(warning);
            out.push('\n');
        }
        out.push_str(&format!(
            "worker threads: {}, {}\n",
            self.server.threads,
            if self.server.work_stealing {
                "work stealing on (one proxy for all)"
            } else {
                "each with its own proxy and upstream pool (work stealing off)"
            }
        ));
        let from: Vec<&str> = [
            &self.server.client_bind_to_ipv4,
            &self.server.client_bind_to_ipv6,
        ]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
        if !from.is_empty() {
            out.push_str(&format!(
                "connections to origins are made from: {} (one of the origin's address family, at random)\n",
                from.join(", ")
            ));
        }
        if let Some(grace) = self.server.grace_period_seconds {
            // Pingora's own default for the second part, when the file does not set it.
            let stop = self.server.graceful_shutdown_timeout_seconds.unwrap_or(5);
            out.push_str(&format!(
                "shutdown grace period: {grace}s, then up to {stop}s to stop: exits within \
                 {}s of SIGTERM (the container runtime's stop timeout must be longer)\n",
                grace + stop
            ));
        }
        if !self.middlewares.is_empty() {
            out.push_str("middlewares:\n");
            for instance in self.middlewares.values() {
                out.push_str(&format!(
                    "  {:<20} {:<18} priority {}{}\n",
                    instance.name,
                    instance.kind,
                    instance.priority,
                    if instance.enabled { "" } else { " (disabled)" }
                ));
            }
        }
        out.push_str("routes (in precedence order):\n");
        for (host, routes) in self.routes.describe() {
            for (path, route) in routes {
                let chain: Vec<&str> = route.chain.iter().map(|i| i.name.as_str()).collect();
                out.push_str(&format!(
                    "  {host:<24} {path:<28} -> {:<16} [{}]",
                    route.service.name, route.name
                ));
                if !chain.is_empty() {
                    out.push_str(&format!(" chain: {}", chain.join(", ")));
                }
                out.push('\n');
            }
        }
        out
    }
}
