//! `ztunnel local`: the local mesh (the `localmesh` crate); this file only maps verbs to it.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use localmesh::plan::{Doc, parse_docs};
use localmesh::{Config, Error as LocalError, mesh};

use super::Error;
use crate::cli::{LocalArgs, LocalCommand};

fn config(args: &LocalArgs) -> Result<Config, Error> {
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        what: "finding this executable".into(),
        source,
    })?;
    let mut c = Config::new(exe);
    c.run_dir = args.run_dir.clone();
    c.prefix = args.prefix.clone();
    c.base = args.subnet;
    c.backend = args.backend.clone();
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
        LocalCommand::Up { manifests } => {
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
                say(&format!("GATEWAY_IP={}", g.placement.ip));
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
            print!("{}", mesh::logs(&c, &part, node.as_deref()).map_err(local)?);
            Ok(ExitCode::SUCCESS)
        }
        LocalCommand::Status => {
            print!("{}", mesh::status(&c).map_err(local)?);
            Ok(ExitCode::SUCCESS)
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
        } => {
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
            let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
            localmesh::app::serve(addr, behaviour)
                .await
                .map_err(|source| Error::Io {
                    what: format!("serving on {addr}"),
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
