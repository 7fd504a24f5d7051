use imn_agent::config::{AgentConfig, Command, Flags};
use imn_agent::Agent;

fn main() -> anyhow::Result<()> {
    // Everything the agent creates (its data directory, the outbox's files, the id and
    // panic files) is for its own user only: 0700 directories, 0600 files.
    // SAFETY: umask(2) only sets the process's file mode creation mask.
    unsafe { libc::umask(0o077) };
    // RUST_LOG as `LEVEL` or `target=LEVEL,...` (no regex patterns).
    imn_agent::log::Log::install();
    let flags = match Flags::from_env()? {
        Command::Run(f) => *f,
        Command::Help(text) | Command::Version(text) => {
            use std::io::Write;
            // A closed pipe (`imn-agent --help | head`) is not an error.
            let _ = writeln!(std::io::stdout(), "{text}");
            return Ok(());
        }
    };
    let print = flags.print_config;
    let cfg = AgentConfig::load(flags)?;
    let child = std::env::var_os(imn_agent::update::CHILD_ENV).is_some();
    if cfg.supervised() && !child && !print {
        // The supervisor: it starts the agent (this binary or a newer verified
        // release) as its child, and tries updates and remote settings on trial.
        std::process::exit(imn_agent::launcher::run(&cfg));
    }
    if child {
        imn_agent::launcher::bind_to_supervisor();
    }
    imn_agent::crash::install_hook(&cfg.data);
    if print {
        use std::io::Write;
        let _ = write!(
            std::io::stdout(),
            "{}",
            imn_agent::flat_toml::to_string(&cfg.redacted())?
        );
        return Ok(());
    }
    // One thread is enough for the agent; ping's blocking probes and the outbox's disk
    // syncs get their own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let restart = rt.block_on(async {
        let agent = Agent::new(cfg)?;
        let restart = agent.restart_requested();
        agent.run(shutdown_signal()).await?;
        anyhow::Ok(restart.load(std::sync::atomic::Ordering::SeqCst))
    })?;
    if restart {
        // A release or new settings are staged: the supervisor starts them.
        std::process::exit(imn_agent::update::EXIT_RESTART);
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
