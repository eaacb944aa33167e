//! `ztunnel local`: the local mesh (the `localmesh` crate); this file only maps verbs to it.

use crate::args::CaptureBackend;
use clap::{Args, Subcommand};
use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use localmesh::plan::{Doc, parse_docs};
use localmesh::{Config, Error as LocalError, mesh};

use super::Error;

#[derive(Debug, Args)]
pub(crate) struct LocalArgs {
    /// Run directory: state, manifests, logs, sockets (`ZTUNNEL_LOCAL_DIR`).
    #[arg(
        long,
        global = true,
        env = "ZTUNNEL_LOCAL_DIR",
        default_value = "/run/ztunnel-local"
    )]
    pub(crate) run_dir: PathBuf,
    /// Prefix of every network namespace and link the mesh makes.
    #[arg(long, global = true, default_value = "zl")]
    pub(crate) prefix: String,
    /// First two octets of the mesh's addresses (nodes in A.B.0.0/24, node i's pods in
    /// A.B.(1+i).0/24).
    #[arg(long, global = true, default_value = "10.250", value_parser = parse_subnet)]
    pub(crate) subnet: [u8; 2],
    /// Capture rules of the node agents.
    #[arg(long, global = true, value_enum, default_value_t = CaptureBackend::Iptables)]
    pub(crate) backend: CaptureBackend,
    #[command(subcommand)]
    pub(crate) command: LocalCommand,
}

/// What `ztunnel local label` labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LabelKind {
    /// A namespace.
    #[value(alias = "ns")]
    Namespace,
}

/// A part of the mesh whose log `ztunnel local logs` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Part {
    /// The node proxies.
    Ztunnel,
    /// The node agents.
    NodeAgent,
    /// The control plane.
    Controlplane,
}

impl Part {
    /// The part's name as the mesh's run directory names its logs.
    fn as_str(self) -> &'static str {
        match self {
            Part::Ztunnel => "ztunnel",
            Part::NodeAgent => "node-agent",
            Part::Controlplane => "controlplane",
        }
    }
}

fn parse_subnet(text: &str) -> Result<[u8; 2], String> {
    let parts: Vec<&str> = text.split('.').collect();
    match parts.as_slice() {
        [a, b] => match (a.parse::<u8>(), b.parse::<u8>()) {
            (Ok(a), Ok(b)) => Ok([a, b]),
            _ => Err(format!("{text:?}: expected two octets such as 10.250")),
        },
        _ => Err(format!("{text:?}: expected two octets such as 10.250")),
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum LocalCommand {
    /// Create the nodes and pods and start everything (cleans up a crashed mesh first); returns
    /// once every proxy is ready.
    Up {
        /// Kubernetes YAML to run (a file or a directory of them); default: the walkthrough's
        /// workloads (examples/ambient-walkthrough/apps.yaml, built in).
        #[arg(long, value_name = "PATH")]
        manifests: Option<PathBuf>,
        /// The address families of pods and services: `ipv4`, `ipv6` (`fd7a:<subnet>::/32`) or
        /// `dual` (both, IPv4 first). The nodes and the control plane talk IPv4 either way.
        #[arg(long, value_name = "FAMILY", default_value = "ipv4")]
        ip_family: localmesh::plan::IpFamily,
        /// A resolver the node proxies forward names outside the mesh to (port 53; repeat for
        /// more), reachable from the nodes: e.g. one you run on the host's mesh address
        /// `A.B.0.1`. Without one, such names are answered REFUSED and logged.
        #[arg(long = "dns-upstream", value_name = "IP")]
        dns_upstreams: Vec<std::net::IpAddr>,
    },
    /// Stop everything and remove every namespace, link, rule, process and file the mesh made.
    Down,
    /// Set (`k=v`) or remove (`k-`) labels: `ztunnel local label namespace default
    /// istio.io/dataplane-mode=ambient`.
    Label {
        /// What is labelled: only a namespace (`namespace` or `ns`).
        #[arg(value_enum)]
        kind: LabelKind,
        /// The namespace.
        name: String,
        /// Changes.
        #[arg(required = true)]
        labels: Vec<String>,
    },
    /// Add or replace documents (Namespace, ServiceAccount, Deployment, Service,
    /// AuthorizationPolicy).
    Apply {
        /// A file or directory of Kubernetes YAML.
        #[arg(short = 'f', long = "filename", value_name = "PATH")]
        file: PathBuf,
    },
    /// Remove the documents a file names.
    Delete {
        /// A file or directory of Kubernetes YAML.
        #[arg(short = 'f', long = "filename", value_name = "PATH")]
        file: PathBuf,
    },
    /// Run a command inside a pod's network namespace (`NAME` in `default`, or `NS/NAME`).
    Exec {
        /// The pod.
        pod: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a part's log.
    Logs {
        /// Whose log.
        #[arg(value_enum)]
        part: Part,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Nodes, proxies, pods (captured or not, certificates), services.
    Status,
    /// Restart a part of the running mesh; its pods and rules stay. `ztunnel`: each node's proxy
    /// (or `--node`'s) the rolling way: the new proxy starts beside the old one, and once it
    /// listens in every pod the old one serves, the old one gets SIGTERM and drains (new
    /// connections are never refused; those the old one still holds have its drain deadline).
    /// `node-agent`, `controlplane`: stopped (SIGTERM), then started again.
    Restart {
        /// What to restart.
        #[arg(value_enum)]
        part: Part,
        /// Only this node's (default: every node's, one after another).
        #[arg(long)]
        node: Option<String>,
        /// SIGKILL instead: the old process is killed first and its connections cut (a crash).
        #[arg(long)]
        kill: bool,
    },
    /// Replay the ambient walkthrough on a fresh mesh, checking every step; removes the mesh at
    /// the end. Exit 0 only if every observation matched.
    Tutorial,
    /// Traffic through the mesh while its parts fail, every connection's bytes and outcome
    /// checked against the policy in force, leaks watched; brings a mesh up unless one runs.
    /// Prints `soak: C connections, W wrong (...), L leaks, F faults injected` and writes a JSON
    /// report; exit 0 only when nothing was wrong and nothing leaked.
    Soak {
        /// How long the traffic runs, in minutes (fractions allowed).
        #[arg(long, default_value_t = 3.0)]
        minutes: f64,
        /// New connections per second (each sends 4 KiB through the echo service and checks it
        /// back).
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// Long-lived connections carrying data both ways the whole time.
        #[arg(long, default_value_t = 20)]
        long: u32,
        /// The faults, injected in turn: `all`, `none`, or some of controlplane, node-agent,
        /// proxy-kill, proxy-restart, policy, pods, label, certs (comma-separated).
        #[arg(long, default_value = "all", value_parser = parse_faults)]
        faults: FaultList,
        /// One fault every this many seconds, in turn, from a tenth of the run to its last
        /// tenth (an hour's soak with `--fault-every 60` injects about 48). Default: each fault
        /// once, spread over the run.
        #[arg(long, value_name = "SECONDS")]
        fault_every: Option<f64>,
        /// Where the JSON report (totals, wrong connections, leaks, faults, timeline) goes; its
        /// picture (a PNG of the timeline: connections per second, long-lived connections,
        /// memory per part, faults marked) goes beside it, `.png` for `.json`.
        #[arg(long, value_name = "PATH", default_value = "soak-report.json")]
        report: PathBuf,
        /// Seconds around a policy change in which either outcome is right, and after a fault
        /// in which connections may still fail because of it.
        #[arg(long, default_value_t = 3.0)]
        grace: f64,
        /// Make a wrong outcome on purpose, to see the soak catch it and fail: `denied-served`
        /// (the policy fault denies someone else while the soak expects its own traffic
        /// denied) or `plaintext` (one connection slips past the client's capture); repeatable.
        #[arg(long, value_name = "WRONG", value_parser = localmesh::soak::Injection::parse)]
        inject: Vec<localmesh::soak::Injection>,
    },
    /// A built-in app (what the mesh runs in a pod).
    #[command(hide = true)]
    App {
        /// The app's name (answers carry it).
        #[arg(long)]
        name: String,
        /// Port.
        #[arg(long)]
        port: u16,
        /// URL to call first.
        #[arg(long)]
        upstream: Option<String>,
        /// Gateway routes, `host=url`.
        #[arg(long)]
        route: Vec<String>,
        /// A TCP echo instead of HTTP.
        #[arg(long)]
        echo: bool,
    },
    /// GET a URL and print the body (exit 1 unless 200): `ztunnel local exec sleep -- ztunnel
    /// local get http://web-api:8080/`.
    Get {
        /// `http://host[:port]/path`.
        url: String,
        /// Host header.
        #[arg(long)]
        host: Option<String>,
    },
}

/// `ztunnel local restart`: each node's part (or `node`'s) in turn, then the control plane.
fn restart(c: &Config, part: Part, node: Option<&str>, kill: bool) -> Result<(), Error> {
    let stop = match (part, kill) {
        (_, true) => mesh::Stop::Kill,
        (Part::Ztunnel, false) => mesh::Stop::Rolling,
        (_, false) => mesh::Stop::Graceful,
    };
    let running = mesh::load(c).map_err(Error::Local)?;
    // The nodes whose part restarts; the control plane's is the host's (no node).
    let nodes: Vec<Option<String>> = match (part, node) {
        (Part::Controlplane, Some(n)) => {
            return Err(Error::Flag {
                flag: "--node",
                value: n.to_owned(),
                reason: "the control plane runs on the host, not on a node".into(),
            });
        }
        (Part::Controlplane, None) => vec![None],
        (_, Some(n)) if running.node_index(n).is_none() => {
            return Err(Error::Flag {
                flag: "--node",
                value: n.to_owned(),
                reason: format!("no such node (the mesh has {})", running.nodes.join(", ")),
            });
        }
        (_, Some(n)) => vec![Some(n.to_owned())],
        (_, None) => running.nodes.iter().cloned().map(Some).collect(),
    };
    let mesh_part = match part {
        Part::Ztunnel => mesh::Part::Proxy,
        Part::NodeAgent => mesh::Part::NodeAgent,
        Part::Controlplane => mesh::Part::ControlPlane,
    };
    for on in nodes.iter().map(Option::as_deref) {
        let done = mesh::restart(c, mesh_part, on, stop).map_err(Error::Local)?;
        let whose = on.map_or_else(
            || "the control plane".to_owned(),
            |n| format!("{n}'s {}", part.as_str()),
        );
        say(&format!(
            "{whose}: {:?} -> pid {} ({}; the old one gone {:.1} s after its signal)",
            done.old,
            done.new,
            match stop {
                mesh::Stop::Rolling =>
                    "rolling: the new one served every pod before the old one drained",
                mesh::Stop::Kill => "killed",
                mesh::Stop::Graceful => "stopped, then started",
            },
            done.exited.duration_since(done.signalled).as_secs_f64()
        ));
    }
    Ok(())
}

/// The faults of `--faults`.
#[derive(Debug, Clone)]
pub(crate) struct FaultList(Vec<localmesh::soak::Fault>);

fn parse_faults(text: &str) -> Result<FaultList, String> {
    localmesh::soak::Fault::parse_list(text).map(FaultList)
}

fn config(args: &LocalArgs) -> Result<Config, Error> {
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        what: "finding this executable".into(),
        source,
    })?;
    let mut c = Config::new(exe);
    c.run_dir = args.run_dir.clone();
    c.prefix = args.prefix.clone();
    c.base = args.subnet;
    c.backend = args.backend.as_str().to_owned();
    Ok(c)
}

fn read_docs(path: &Path) -> Result<Vec<Doc>, Error> {
    let files = if path.is_dir() {
        controlplane::manifest_files(path)
    } else {
        vec![path.to_owned()]
    };
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|source| Error::Io {
            what: format!("cannot read {}", f.display()),
            source,
        })?;
        docs.extend(parse_docs(&text, &f.display().to_string()).map_err(LocalError::from)?);
    }
    Ok(docs)
}

fn say(line: &str) {
    eprintln!("{line}");
}

/// Runs `work` on a blocking thread; Ctrl-C sets its cancel flag (it then cleans up and stops).
async fn cancellable<T: Send + 'static>(
    work: impl FnOnce(&AtomicBool) -> Result<T, LocalError> + Send + 'static,
) -> Result<T, LocalError> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let mut task = tokio::task::spawn_blocking(move || work(&flag));
    tokio::select! {
        done = &mut task => done.unwrap_or(Err(LocalError::Interrupted)),
        _ = tokio::signal::ctrl_c() => {
            say("interrupted: cleaning up");
            cancel.store(true, Ordering::SeqCst);
            task.await.unwrap_or(Err(LocalError::Interrupted))
        }
    }
}

pub(crate) async fn run(args: LocalArgs) -> Result<ExitCode, Error> {
    let c = config(&args)?;
    let local = |e: LocalError| Error::Local(e);
    match args.command {
        LocalCommand::Up {
            manifests,
            ip_family,
            dns_upstreams,
        } => {
            let mut c = c.clone();
            c.ip_family = ip_family;
            c.dns_upstreams = dns_upstreams;
            let docs = match &manifests {
                Some(p) => read_docs(p)?,
                None => parse_docs(localmesh::tutorial::APPS, "built-in walkthrough")
                    .map_err(LocalError::from)
                    .map_err(local)?,
            };
            let c2 = c.clone();
            let mesh = cancellable(move |cancel| mesh::up(&c2, docs, cancel, &mut |l| say(l)))
                .await
                .map_err(local)?;
            say(&format!("mesh up: run directory {}", c.run_dir.display()));
            if let Some(g) = mesh.pod("istio-system", "istio-ingressgateway") {
                let first = mesh.pod_addresses(&g.placement).first().copied();
                say(&format!(
                    "GATEWAY_IP={}",
                    first.unwrap_or(g.placement.ip.into())
                ));
            }
            say(
                "next: ztunnel local status | ztunnel local label namespace default istio.io/dataplane-mode=ambient",
            );
            Ok(ExitCode::SUCCESS)
        }
        LocalCommand::Down => {
            mesh::down(&c, &mut |l| say(l)).map_err(local)?;
            say("mesh removed");
            Ok(ExitCode::SUCCESS)
        }
        LocalCommand::Label { name, labels, .. } => {
            mesh::label(&c, &name, &labels, &mut |l| say(l)).map_err(local)?;
            Ok(ExitCode::SUCCESS)
        }
        LocalCommand::Apply { file } => {
            let docs = read_docs(&file)?;
            mesh::apply(&c, docs, false, &mut |l| say(l)).map_err(local)?;
            Ok(ExitCode::SUCCESS)
        }
        LocalCommand::Delete { file } => {
            let docs = read_docs(&file)?;
            mesh::apply(&c, docs, true, &mut |l| say(l)).map_err(local)?;
            Ok(ExitCode::SUCCESS)
        }
        LocalCommand::Exec { pod, command } => {
            let code = mesh::exec(&c, &pod, &command).map_err(local)?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        LocalCommand::Logs { part, node } => {
            print!(
                "{}",
                mesh::logs(&c, part.as_str(), node.as_deref()).map_err(local)?
            );
            Ok(ExitCode::SUCCESS)
        }
        LocalCommand::Restart { part, node, kill } => {
            restart(&c, part, node.as_deref(), kill)?;
            Ok(ExitCode::SUCCESS)
        }
        LocalCommand::Status => {
            print!("{}", mesh::status(&c).map_err(local)?);
            Ok(ExitCode::SUCCESS)
        }
        LocalCommand::Soak {
            minutes,
            rate,
            long,
            faults,
            fault_every,
            report,
            grace,
            inject,
        } => {
            if let Some(every) = fault_every
                && !(every > 0.0 && every.is_finite())
            {
                return Err(Error::Flag {
                    flag: "--fault-every",
                    value: every.to_string(),
                    reason: "must be a positive number of seconds".into(),
                });
            }
            if !(minutes > 0.0 && minutes.is_finite()) {
                return Err(Error::Flag {
                    flag: "--minutes",
                    value: minutes.to_string(),
                    reason: "must be a positive number of minutes".into(),
                });
            }
            if !(grace >= 0.0 && grace.is_finite()) {
                return Err(Error::Flag {
                    flag: "--grace",
                    value: grace.to_string(),
                    reason: "must be zero or more seconds".into(),
                });
            }
            let soak = localmesh::soak::SoakConfig {
                duration: Duration::from_secs_f64(minutes * 60.0),
                rate,
                long,
                faults: faults.0,
                fault_every: fault_every.map(Duration::from_secs_f64),
                grace: Duration::from_secs_f64(grace),
                inject,
            };
            let c2 = c.clone();
            let result = cancellable(move |cancel| {
                localmesh::soak::run(&c2, &soak, cancel, &mut |l| say(l))
            })
            .await
            .map_err(local)?;
            let json = serde_json::to_string_pretty(&result).map_err(|e| Error::Io {
                what: "encoding the soak report".into(),
                source: std::io::Error::other(e),
            })?;
            std::fs::write(&report, json).map_err(|source| Error::Io {
                what: format!("writing {}", report.display()),
                source,
            })?;
            let picture = report.with_extension("png");
            std::fs::write(&picture, localmesh::soak::picture::render(&result)).map_err(
                |source| Error::Io {
                    what: format!("writing {}", picture.display()),
                    source,
                },
            )?;
            for example in &result.wrong_examples {
                say(&format!("wrong: {example}"));
            }
            for leak in &result.leaks {
                say(&format!("leak: {leak}"));
            }
            println!("{}", result.summary());
            say(&format!(
                "report: {} (picture: {})",
                report.display(),
                picture.display()
            ));
            Ok(if result.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LocalCommand::Tutorial => {
            let c2 = c.clone();
            cancellable(move |cancel| {
                localmesh::tutorial::run(&c2, cancel, &mut |l| println!("{l}"))
            })
            .await
            .map_err(local)?;
            Ok(ExitCode::SUCCESS)
        }
        LocalCommand::App {
            name,
            port,
            upstream,
            route,
            echo,
        } => {
            if echo {
                localmesh::app::serve_echo(port)
                    .await
                    .map_err(|source| Error::Io {
                        what: format!("echoing on port {port}"),
                        source,
                    })?;
                return Ok(ExitCode::SUCCESS);
            }
            let behaviour = if route.is_empty() {
                localmesh::app::Behaviour::Http { name, upstream }
            } else {
                let routes = route
                    .iter()
                    .map(|r| {
                        r.split_once('=')
                            .map(|(h, u)| (h.to_owned(), u.to_owned()))
                            .ok_or_else(|| Error::Flag {
                                flag: "--route",
                                value: r.clone(),
                                reason: "expected host=url".into(),
                            })
                    })
                    .collect::<Result<_, _>>()?;
                localmesh::app::Behaviour::Gateway { routes }
            };
            localmesh::app::serve_port(port, behaviour)
                .await
                .map_err(|source| Error::Io {
                    what: format!("serving on port {port}"),
                    source,
                })?;
            Ok(ExitCode::SUCCESS)
        }
        LocalCommand::Get { url, host } => {
            match localmesh::app::get(&url, host.as_deref(), Duration::from_secs(10)).await {
                Ok(a) => {
                    print!("{}", a.body);
                    if a.status == 200 {
                        Ok(ExitCode::SUCCESS)
                    } else {
                        eprintln!("HTTP {}", a.status);
                        Ok(ExitCode::from(1))
                    }
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}
