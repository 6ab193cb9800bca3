//! `middleware_services`, the chains of each level (global, host rule, route rule), and
//! the route table.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::{dir_of, Parts};
use crate::config::file::{HostRuleFile, MiddlewareFile};
use crate::config::Instances;
use crate::error::{ConfigError, ConfigErrorKind as Kind};
use crate::metrics::Metrics;
use crate::middleware::{join_levels, Build, Chain, Instance};
use crate::routing::{HostRoutes, Route, RouteTable};
use crate::state::State;
use crate::upstream::Service;
use crate::yaml::{KeyPath, Source};

/// Every `middleware_services` instance of every file, by name.
pub fn middlewares(
    sources: &[Source],
    parts: &[Parts],
    base: &Path,
    state: &State,
    previous: &Instances,
    services: &BTreeMap<String, Arc<Service>>,
) -> Result<Instances, ConfigError> {
    let mut middlewares: Instances = BTreeMap::new();
    let mut defined_in: BTreeMap<String, usize> = BTreeMap::new();
    for (src, part) in parts.iter().enumerate() {
        let source = &sources[src];
        let dir = dir_of(sources, src, base);
        for (i, entry) in part.middleware_services.iter().enumerate() {
            let path = KeyPath::root().key("middleware_services").index(i);
            if let Some(&first) = defined_in.get(&entry.name) {
                return Err(source.error(
                    path.key("name"),
                    Kind::DuplicateMiddleware {
                        name: entry.name.clone(),
                        first: sources[first].file.display().to_string(),
                    },
                ));
            }
            let instance = instance(source, &path, entry, dir, state, previous, services)?;
            defined_in.insert(entry.name.clone(), src);
            middlewares.insert(entry.name.clone(), Arc::new(instance));
        }
    }
    Ok(middlewares)
}

/// The chains of one host rule: for its own target, and for each route rule.
struct RuleChains {
    host: Chain,
    routes: Vec<Chain>,
}

/// The route table of every file's host rules; `global` are the main file's
/// `middlewares`.
pub fn routes(
    sources: &[Source],
    parts: &[Parts],
    global: &[String],
    services: &BTreeMap<String, Arc<Service>>,
    middlewares: &Instances,
    state: &State,
) -> Result<RouteTable, ConfigError> {
    let resolve = |source: &Source, path: KeyPath, names: &[String]| {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                middlewares.get(name).cloned().ok_or_else(|| {
                    source.error(path.index(i), Kind::UnknownMiddleware(name.clone()))
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let global_chain = resolve(&sources[0], KeyPath::root().key("middlewares"), global)?;
    let mut routes = RouteTable::default();
    for (src, part) in parts.iter().enumerate() {
        for (i, rule) in part.host_rules.iter().enumerate() {
            let source = &sources[src];
            let path = KeyPath::root().key("host_rules").index(i);
            let host_chain = resolve(source, path.key("middlewares"), &rule.middlewares)?;
            let mut route_chains = Vec::with_capacity(rule.route_rules.len());
            for (j, route) in rule.route_rules.iter().enumerate() {
                let rpath = path.key("route_rules").index(j).key("middlewares");
                let own = resolve(source, rpath, &route.middlewares)?;
                route_chains.push(join_levels(vec![
                    global_chain.clone(),
                    host_chain.clone(),
                    own,
                ]));
            }
            let chains = RuleChains {
                host: join_levels(vec![global_chain.clone(), host_chain]),
                routes: route_chains,
            };
            add_host_rule(
                &mut routes,
                source,
                &path,
                rule,
                services,
                chains,
                &state.metrics,
            )?;
        }
    }
    Ok(routes)
}

/// Builds a `middleware_services` entry, or reuses the previous config's middleware when
/// it keeps state and its type and config are unchanged.
fn instance(
    source: &Source,
    path: &KeyPath,
    entry: &MiddlewareFile,
    dir: &Path,
    state: &State,
    previous: &Instances,
    services: &BTreeMap<String, Arc<Service>>,
) -> Result<Instance, ConfigError> {
    let fingerprint = format!("{:?}", entry.config);
    let middleware = match previous.get(&entry.name) {
        Some(old) if old.fingerprint == fingerprint && entry.config.keeps_state() => {
            old.middleware.clone()
        }
        _ => entry
            .config
            .build(&Build {
                name: &entry.name,
                base: dir,
                limits: &state.limits,
                services,
                metrics: &state.metrics,
            })
            .map_err(|e| source.error(path.key("config"), Kind::Invalid(e)))?
            .into(),
    };
    Ok(Instance {
        name: entry.name.clone(),
        kind: entry.config.kind(),
        priority: entry.priority,
        enabled: entry.enabled,
        fingerprint,
        middleware,
    })
}

fn add_host_rule(
    routes: &mut RouteTable,
    source: &Source,
    path: &KeyPath,
    rule: &HostRuleFile,
    services: &BTreeMap<String, Arc<Service>>,
    chains: RuleChains,
    metrics: &Metrics,
) -> Result<(), ConfigError> {
    let service = |path: KeyPath, name: &str| {
        services
            .get(name)
            .cloned()
            .ok_or_else(|| source.error(path, Kind::UnknownService(name.to_string())))
    };
    let host = &rule.pattern.0;
    let host_label = match rule.port {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let fallback = match &rule.target {
        Some(target) => {
            let name = rule.name.clone().unwrap_or_else(|| host_label.clone());
            let service = service(path.key("target"), target)?;
            Some(Arc::new(Route {
                metrics: metrics.route(&name, &service.name),
                name,
                service,
                chain: chains.host.clone(),
            }))
        }
        None => None,
    };
    let mut host_routes = HostRoutes::new(fallback);
    for ((j, route), chain) in rule.route_rules.iter().enumerate().zip(chains.routes) {
        let rpath = path.key("route_rules").index(j);
        let pattern = route.pattern.0.clone();
        let name = route
            .name
            .clone()
            .unwrap_or_else(|| format!("{host_label}{}", pattern.source()));
        let service = service(rpath.key("target"), &route.target)?;
        let compiled = Arc::new(Route {
            metrics: metrics.route(&name, &service.name),
            name,
            service,
            chain,
        });
        if !host_routes.add(pattern.clone(), compiled) {
            return Err(source.error(
                rpath.key("pattern"),
                Kind::DuplicateRouteRule(pattern.source()),
            ));
        }
    }
    if !routes.add_host(host.clone(), rule.port, host_routes) {
        return Err(source.error(path.key("pattern"), Kind::DuplicateHostRule(host_label)));
    }
    Ok(())
}
