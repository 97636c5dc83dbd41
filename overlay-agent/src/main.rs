use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser as _;
use overlay_agent::{
    cli::{Cli, Command, RouteCommand, RunArgs},
    dataplane,
    maps::{Maps, Route},
    netdev, report,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let dir = cli.bpffs_dir;
    match cli.command {
        None => run_agent(&cli.run, dir),
        Some(Command::Routes) => {
            print!("{}", report::routes_table(&Maps::open(&dir)?.routes()?));
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Stats) => {
            let maps = Maps::open(&dir)?;
            print!("{}", report::stats_table(&maps.counters()?, &maps.peer_totals()?));
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Status) => {
            let st = dataplane::status(&dir)?;
            println!(
                "device={} underlay={} encap={} decap={:?} ready={}",
                st.device.as_deref().unwrap_or("-"),
                st.underlay.as_deref().unwrap_or("-"),
                if st.encap_attached { "attached" } else { "detached" },
                st.decap_hook,
                st.config.is_ready()
            );
            Ok(if st.is_up() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Some(Command::Route(RouteCommand::Add { subnet, public_ip, vtep_mac })) => {
            let mut maps = Maps::open(&dir)?;
            maps.upsert_route(&Route { subnet: subnet.trunc(), public_ip, vtep_mac: vtep_mac.unwrap_or([0; 6]) })?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Route(RouteCommand::Del { subnet })) => {
            Maps::open(&dir)?.remove_route(subnet.trunc())?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Teardown) => {
            dataplane::teardown(&dir)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The agent: bring the data plane up, then wait for a signal. The data plane stays.
fn run_agent(args: &RunArgs, dir: std::path::PathBuf) -> Result<ExitCode> {
    let spec = args.node_spec(dir)?;
    let dp = dataplane::up(&spec)?;
    if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
        tracing::warn!("net.ipv4.ip_forward is 0: containers will not be reachable across nodes");
    }
    tracing::info!(
        device = %spec.device,
        vtep_mac = %netdev::format_mac(&dp.device.mac),
        mtu = dp.mtu,
        underlay = %spec.iface,
        public_ip = %spec.public_ip,
        decap = ?dp.decap_hook,
        subnet = %spec.subnet,
        "data plane up"
    );
    let mut dp = dp;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let logs = program_logs(&mut dp.ebpf);
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: exiting, the data plane keeps forwarding"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: exiting, the data plane keeps forwarding"),
            r = logs => r?,
        }
        anyhow::Ok(())
    })?;
    drop(dp);
    Ok(ExitCode::SUCCESS)
}

/// Forward the programs' aya-log records (failure paths only) to our log until cancelled.
async fn program_logs(ebpf: &mut aya::Ebpf) -> Result<()> {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "program logs unavailable");
            return std::future::pending().await;
        }
    };
    let mut fd = tokio::io::unix::AsyncFd::with_interest(logger, tokio::io::Interest::READABLE)
        .context("polling the program log ring buffer")?;
    loop {
        let mut guard = fd.readable_mut().await.context("program log ring buffer")?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
