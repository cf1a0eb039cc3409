//! `mesh-node gateway`, wired: an ingress gateway in its own pod. It reads the same config
//! as the agents, gets its pod's certificate from the same CA, and serves the ports of the
//! Gateways that select its pod (see [`crate::gateway`]).
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    agent::{ProxyParts, workload_mtls},
    source::ConfigSource,
};
use crate::{
    admin::{Admin, GatewayAdmin, LogControl},
    cli::GatewayConfig,
    egress::OutboundTrafficPolicy,
    endpoints::{self, Endpoints},
    gateway::{
        serve::{self, Gateway, Plan},
        status,
    },
    inventory::ObjectKey,
    jwks,
    metrics::Metrics,
    netns::Netns,
    proxy::{PodContext, Resolver},
    readiness::Readiness,
    signal,
    state::{State, StateRx},
};

/// How often a draining gateway looks whether its connections have finished.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The running gateway.
pub struct BoundGateway {
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub health_addr: SocketAddr,
    readiness: Readiness,
    /// Stops the listeners.
    listening: CancellationToken,
    /// Tells the connections being served to finish.
    drain: CancellationToken,
    drain_delay: Duration,
    drain_timeout: Duration,
    /// One clone per connection being served.
    in_flight: Arc<()>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

pub async fn build_gateway(
    config: GatewayConfig,
    log: Option<LogControl>,
) -> anyhow::Result<BoundGateway> {
    info!(config = %serde_json::to_string(&config)?, "starting mesh-node gateway");
    let readiness = Readiness::default();
    let config_ready = readiness.register("config");
    let pod_known = readiness.register("gateway-pod");
    let metrics = Metrics::new().context("registering metrics")?;
    let shutdown = CancellationToken::new();
    let endpoints::Listeners {
        metrics: metrics_listener,
        health: health_listener,
        admin: admin_listener,
    } = endpoints::Listeners::bind(&config.endpoints)?;
    let (admin_addr, metrics_addr, health_addr) = (
        admin_listener.local_addr()?,
        metrics_listener.local_addr()?,
        health_listener.local_addr()?,
    );
    let mut tasks = JoinSet::new();
    tasks.spawn(endpoints::serve(
        health_listener,
        Endpoints::Health(readiness.clone()),
        shutdown.clone(),
    ));

    let (state_tx, state_rx) = watch::channel(Arc::new(State::default()));
    let source = ConfigSource::start(
        config.config_source,
        config.config_dir.as_deref(),
        &config.root_namespace,
        &state_tx,
        &metrics.node,
    )
    .await?
    .for_gateway(&config.pod_namespace);
    let status_client = source.kube_client();
    tasks.spawn(source.run(
        state_tx,
        metrics.node.clone(),
        config_ready,
        shutdown.clone(),
    ));
    let mtls = workload_mtls(
        &config.identity,
        &config.node_name,
        &config.root_namespace,
        &metrics.node,
        state_rx.clone(),
        &readiness,
    )
    .await?;
    let me = ObjectKey::new(&config.pod_namespace, &config.pod_name);
    let ips = own_addresses(&mut state_rx.clone(), &me).await;
    drop(pod_known);
    let home = Arc::new(Netns::current().context("opening the gateway's netns")?);
    // Requests from outside are authenticated here, by the RequestAuthentications that
    // select the gateway.
    let proxy = ProxyParts {
        observability: &config.observability,
        node: &config.node_name,
        metrics: &metrics,
        state: &state_rx,
        capture: None,
        // Routes name Services; what is not one is refused by routing, not by this policy.
        resolver: Resolver::new(OutboundTrafficPolicy::AllowAny),
        home: home.clone(),
        mtls: mtls.clone(),
        keys_for: jwks::Served::Pod(me.clone()),
        jwks_refresh_interval: config.jwks_refresh_interval,
    }
    .build(&mut tasks, &shutdown)?;
    let (connections, drain, jwks) = (
        proxy.connections.clone(),
        proxy.drain.clone(),
        proxy.jwks.clone(),
    );
    let gateway = Gateway {
        pod: PodContext {
            key: me.clone(),
            ips,
            netns: home,
            netns_cookie: 0,
        },
        proxy,
        in_flight: Arc::new(()),
        trusted_proxies: config.num_trusted_proxies,
    };
    let in_flight = gateway.in_flight.clone();
    let (plan_tx, plan_rx) = watch::channel(Arc::new(Plan::default()));
    tasks.spawn(keep_planned(
        state_rx.clone(),
        me.clone(),
        config.gateway_class.clone(),
        plan_tx,
        shutdown.clone(),
    ));
    // With the API server as the source, the Gateway API's status is written back.
    if let Some(client) = status_client {
        tasks.spawn(status::keep_written(
            client,
            state_rx.clone(),
            plan_rx.clone(),
            config.gateway_class.clone(),
            config.pod_namespace.clone(),
            shutdown.clone(),
        ));
    }
    let listening = shutdown.child_token();
    tasks.spawn(serve::run(gateway, plan_rx.clone(), listening.clone()));
    tasks.spawn(endpoints::serve(
        metrics_listener,
        Endpoints::Metrics(Box::new(metrics.clone())),
        shutdown.clone(),
    ));
    let admin = Admin {
        node: config.node_name.clone(),
        state: state_rx,
        mtls,
        readiness: readiness.clone(),
        log,
        connections,
        outbound_traffic_policy: OutboundTrafficPolicy::AllowAny,
        jwt_keys: jwks,
        gateway: Some(GatewayAdmin {
            pod: me,
            plans: plan_rx,
        }),
    };
    tasks.spawn(endpoints::serve(
        admin_listener,
        Endpoints::Admin(Arc::new(admin)),
        shutdown.clone(),
    ));
    info!(metrics = %metrics_addr, health = %health_addr, admin = %admin_addr, "mesh-node gateway running");
    Ok(BoundGateway {
        admin_addr,
        metrics_addr,
        health_addr,
        readiness,
        listening,
        drain,
        drain_delay: config.drain_delay,
        drain_timeout: config.drain_timeout,
        in_flight,
        shutdown,
        tasks,
    })
}

/// The gateway pod's addresses, once the config knows the pod.
async fn own_addresses(state: &mut StateRx, me: &ObjectKey) -> Vec<std::net::IpAddr> {
    let mut warned = false;
    loop {
        if let Some(pod) = state.borrow_and_update().workloads.get(me) {
            return pod.ips.clone();
        }
        if !warned {
            warn!(pod = %me, "the gateway's own pod is not in the config yet; waiting for it");
            warned = true;
        }
        if state.changed().await.is_err() {
            return Vec::new();
        }
    }
}

/// Plans the listeners again at every config change; logs what cannot be served.
async fn keep_planned(
    mut state: StateRx,
    me: ObjectKey,
    class: String,
    plans: watch::Sender<Arc<Plan>>,
    shutdown: CancellationToken,
) {
    loop {
        let current = state.borrow_and_update().clone();
        let plan = Plan::build(&current, &me, &class, &plans.borrow());
        let known = plans.borrow().problems.clone();
        for problem in plan.problems.iter().filter(|p| !known.contains(p)) {
            warn!(%problem, "gateway server not served as written");
        }
        plans.send_replace(Arc::new(plan));
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = state.changed() => if changed.is_err() { return },
        }
    }
}

impl BoundGateway {
    /// Runs until SIGTERM/SIGINT, then drains.
    pub async fn wait(self) -> anyhow::Result<()> {
        signal::shutdown_requested().await;
        self.stop().await;
        info!("mesh-node gateway stopped");
        Ok(())
    }

    /// Unready but still accepting for the drain delay, then listeners closed and requests
    /// in flight finished (HTTP/1 closed between requests, HTTP/2 told GOAWAY) within the
    /// drain timeout, then everything stops.
    pub async fn stop(mut self) {
        let _draining = self.readiness.register("draining");
        // Still accepting while unready: what was on its way here (a load balancer's health
        // check interval, kube-proxy's rules) still lands, and is served.
        info!(delay = ?self.drain_delay, "unready; accepting until the drain delay passes");
        tokio::time::sleep(self.drain_delay).await;
        self.listening.cancel();
        self.drain.cancel();
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        while Arc::strong_count(&self.in_flight) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL_INTERVAL).await;
        }
        let open = Arc::strong_count(&self.in_flight) - 1;
        if open > 0 {
            warn!(open, "drain deadline passed; closing the connections left");
        }
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}
