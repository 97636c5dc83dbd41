use std::{path::Path, process::ExitCode};

use anyhow::{bail, Context as _, Result};
use overlay_agent::{
    cli::{Cli, Command, ConfigCommand, RouteCommand, RunArgs},
    config, daemon, dataplane,
    lease::{parse_lease_key, registry::Registry},
    maps::{Maps, Route},
    netdev, report,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Run as `flannel` (a link or copy in a CNI plugin directory): the CNI plugin.
    if std::env::args_os().next().is_some_and(|a| overlay_agent::cni::invoked_as_plugin(&a)) {
        return overlay_agent::cni::main();
    }
    let (cli, notes) = match overlay_agent::cli::parse(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        // No colour codes where stderr is a file or journald, only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(cli.log.filter())))
        .with_writer(std::io::stderr)
        .init();
    for n in notes {
        tracing::warn!("{n}");
    }
    for n in cli.log.notes().into_iter().chain(cli.kube.notes()) {
        tracing::info!("{n}");
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: exiting, the data plane keeps forwarding"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: exiting, the data plane keeps forwarding"),
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let dir = cli.bpffs_dir.clone();
    if let (None, Some(why)) = (&cli.command, cli.kube.refusal()) {
        anyhow::bail!(why);
    }
    match cli.command {
        None if cli.run.subnet.is_some() => run_static(&cli.run, dir),
        None => {
            let opts = cli.run.daemon_options(&cli.etcd, dir);
            runtime()?.block_on(daemon::run(opts, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Routes) => {
            let maps = Maps::open(&dir)?;
            print!("{}", report::routes_table(&maps.routes()?, &maps.routes6()?));
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Stats) => {
            let maps = Maps::open(&dir)?;
            print!("{}", report::stats_table(&maps.counters()?, &maps.peer_totals()?, &maps.peer6_totals()?));
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Monitor { decisions, sample, count }) => {
            overlay_agent::monitor::run(&dir, overlay_agent::monitor::MonitorOptions { decisions, sample, count })?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Status) => {
            // A wireguard node runs no programs: its device says it all.
            if let Some((line, up)) = overlay_agent::datapath::wireguard::status_line(&dir)? {
                println!("{line}");
                return Ok(if up { ExitCode::SUCCESS } else { ExitCode::FAILURE });
            }
            // A node running on the kernel device alone has no maps to read.
            if let Some(marker) = overlay_agent::datapath::degraded::reason(&dir) {
                let (where_, why) = marker.split_once('\n').unwrap_or(("", marker.as_str()));
                println!("{where_} encap=kernel decap=kernel attach=- guard=none ready=true degraded=\"{}\"", why.replace('"', "'"));
                return Ok(ExitCode::SUCCESS);
            }
            let st = dataplane::status(&dir)?;
            println!(
                "device={} underlay={} encap={} decap={} attach={} guard={} ready={} kernel_drops={}",
                st.device.as_deref().unwrap_or("-"),
                st.underlay.as_deref().unwrap_or("-"),
                match (st.encap_attached, st.kernel_encapsulates()) {
                    (true, _) => "attached",
                    // The kernel's flannel-v6 or flannel.ipip encapsulates.
                    (false, true) => "kernel",
                    (false, false) => "detached",
                },
                st.decap_hook.map_or("-".to_string(), |h| h.to_string()),
                st.attach.map_or("-".to_string(), |a| a.to_string()),
                st.guard.map_or("detached".to_string(), |g| g.to_string()),
                st.config.is_ready(),
                if st.kernel_drops_traced { "traced" } else { "-" }
            );
            Ok(if st.is_up() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Some(Command::Route(RouteCommand::Add { subnet, public_ip, vtep_mac })) => {
            let mut maps = Maps::open(&dir)?;
            maps.upsert_route(&Route { subnet: subnet.trunc(), public_ip, vtep_mac: vtep_mac.unwrap_or([0; 6]), wireguard: None })?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Route(RouteCommand::Del { subnet })) => {
            Maps::open(&dir)?.remove_route(subnet.trunc())?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Teardown { leave_kernel_state: false }) => {
            dataplane::teardown(&dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Teardown { leave_kernel_state: true }) => {
            dataplane::release_to_flannel(&dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Config(cmd)) => config_command(&cli.etcd, cmd),
        Some(Command::InstallCni(a)) => {
            let exe = std::env::current_exe().context("finding this executable")?;
            let content = overlay_agent::cni::conflist(&a.subnet_file, &a.data_dir);
            let done = overlay_agent::cni::install(&exe, &a.bin_dir, &a.conf_dir, &a.conf_name, &content, a.force)?;
            println!("installed {}", done.plugin.display());
            match done.conflist_written {
                true => println!("wrote {}", done.conflist.display()),
                false => println!("{} is up to date", done.conflist.display()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::MkDockerOpts(args)) => {
            overlay_agent::docker_opts::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Leases) => runtime()?.block_on(async {
            let mut reg = Registry::connect(&cli.etcd.options()).await?;
            let listing = reg.list_leases().await?;
            let mut rows = Vec::new();
            for l in &listing.leases {
                rows.push((l.clone(), reg.time_left(l.etcd_lease).await?));
            }
            print!("{}", report::leases_table(&rows));
            for (key, e) in &listing.malformed {
                println!("malformed: {key}: {e}");
            }
            Ok(ExitCode::SUCCESS)
        }),
        Some(Command::Lease { subnet }) => runtime()?.block_on(async {
            // Either subnet of a lease, as a CIDR or in the key's form (dual-stack and
            // IPv6-only keys too): the lease whose key names it.
            let wanted = subnet
                .parse::<ipnet::IpNet>()
                .ok()
                .or_else(|| parse_lease_key(&subnet).ok().map(|k| k.primary()))
                .with_context(|| format!("{subnet:?} is neither a subnet (10.1.2.0/24, fd00:0:0:1::/64) nor a lease key (10.1.2.0-24)"))?;
            let mut reg = Registry::connect(&cli.etcd.options()).await?;
            let names = |l: &overlay_agent::lease::Lease| match wanted {
                ipnet::IpNet::V4(n) => !l.key().is_ipv6_only() && l.subnet == n,
                ipnet::IpNet::V6(n) => l.subnet6 == Some(n),
            };
            let Some(l) = reg.list_leases().await?.leases.into_iter().find(names) else {
                bail!("no lease for {wanted} under {}", reg.subnets_prefix());
            };
            let key = reg.lease_key(l.key());
            let left = reg.time_left(l.etcd_lease).await?;
            println!("key:       {key}");
            println!("value:     {}", l.attrs.to_json());
            print!("{}", report::leases_table(&[(l, left)]));
            Ok(ExitCode::SUCCESS)
        }),
    }
}

fn config_json(json: Option<String>, file: Option<&Path>) -> Result<Option<String>> {
    match (json, file) {
        (Some(j), _) => Ok(Some(j)),
        (None, Some(f)) => Ok(Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)),
        (None, None) => Ok(None),
    }
}

fn config_command(etcd: &overlay_agent::cli::EtcdArgs, cmd: ConfigCommand) -> Result<ExitCode> {
    let rt = runtime()?;
    match cmd {
        ConfigCommand::Get => rt.block_on(async {
            let mut reg = Registry::connect(&etcd.options()).await?;
            match reg.get_config().await? {
                Some(c) => {
                    println!("{c}");
                    Ok(ExitCode::SUCCESS)
                }
                None => bail!("no network config at {}", reg.config_key()),
            }
        }),
        ConfigCommand::Set { json, file } => {
            let json = config_json(json, file.as_deref())?.context("give the config as an argument or with --file")?;
            let cfg = config::parse(&json)?;
            for w in &cfg.warnings {
                eprintln!("warning: {w}");
            }
            rt.block_on(async {
                let mut reg = Registry::connect(&etcd.options()).await?;
                reg.put_config(json.trim()).await?;
                println!("stored at {}", reg.config_key());
                Ok(ExitCode::SUCCESS)
            })
        }
        ConfigCommand::Validate { json, file } => {
            let json = match config_json(json, file.as_deref())? {
                Some(j) => j,
                None => rt.block_on(async {
                    let mut reg = Registry::connect(&etcd.options()).await?;
                    reg.get_config().await?.with_context(|| format!("no network config at {}", reg.config_key()))
                })?,
            };
            let cfg = config::parse(&json)?;
            for w in &cfg.warnings {
                println!("warning: {w}");
            }
            let v4 = format!("Network={} SubnetLen={} SubnetMin={} SubnetMax={} ({} subnets)", cfg.network, cfg.subnet_len, cfg.subnet_min, cfg.subnet_max, cfg.subnets().count());
            let v6 = cfg.ipv6.map(|c| {
                format!("IPv6Network={} IPv6SubnetLen={} IPv6SubnetMin={} IPv6SubnetMax={}", c.network, c.subnet_len, c.subnet_min, c.subnet_max)
            });
            let nets = match (cfg.enable_ipv4, v6) {
                (true, Some(v6)) => format!("{v4} {v6}"),
                (true, None) => v4,
                (false, v6) => format!("IPv6-only {}", v6.unwrap_or_default()),
            };
            println!("valid: {nets} Backend={} VNI={} Port={}", cfg.backend.type_name(), cfg.backend.vni, cfg.backend.port);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Static mode (no etcd): bring the data plane up, then wait for a signal. It stays.
fn run_static(args: &RunArgs, dir: std::path::PathBuf) -> Result<ExitCode> {
    let spec = args.node_spec(dir)?;
    let mut dp = dataplane::up(&spec)?;
    // Static mode keeps no other rules; the guard's firewall form, where its program cannot
    // run, is installed here (nftables, before defragmentation, else iptables) and stays, as
    // the programs do.
    if dp.guard == overlay_agent::datapath::attach::Guard::Firewall {
        let addr = std::net::IpAddr::V4(spec.underlay_ip);
        let tunnel = overlay_agent::iptables::GuardedTunnel::of(spec.mode, spec.port);
        let installed = if overlay_agent::nftables::has_nft() {
            overlay_agent::nftables::ensure_guard(&overlay_agent::nftables::NftGuard { iface: spec.iface.clone(), addr, tunnel })
                .map(drop)
                .map_err(anyhow::Error::from)
        } else {
            overlay_agent::iptables::ensure(&overlay_agent::iptables::guard("iptables", &spec.iface, addr, tunnel)).map(drop).map_err(anyhow::Error::from)
        };
        installed.context("installing the socket guard's firewall rule")?;
        dataplane::retire_guard_program(&spec.bpffs_dir)?;
    }
    if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
        tracing::warn!("net.ipv4.ip_forward is 0: containers will not be reachable across nodes");
    }
    tracing::info!(
        device = %spec.device,
        vtep_mac = %netdev::format_mac(&dp.device.mac),
        mtu = dp.mtu,
        underlay = %spec.iface,
        public_ip = %spec.public_ip,
        decap = %dp.decap_hook,
        attach = %dp.attach,
        guard = %dp.guard,
        kernel_drops = %dp.kernel_drops,
        subnet = %spec.subnet,
        "data plane up (static mode)"
    );
    runtime()?.block_on(async {
        let logs = overlay_agent::program_logs(&mut dp.ebpf);
        tokio::select! {
            _ = shutdown_signal() => {}
            r = logs => r?,
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
