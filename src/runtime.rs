//! The live runtime: the [`Proxy`] currently serving, swapped whole and atomically on reload
//! (SIGHUP, or a change to the config or a key file), and the watcher that triggers it.
//!
//! Each request takes the runtime current when it arrives and keeps it to its end, so a
//! reload never changes the rules under a request in flight; a replaced runtime (its keys,
//! its pool) is dropped when the last request holding it ends. The admin listener and the
//! server both read the runtime through [`Live`], never a copy. Imports `proxy` and
//! `config`; nothing above.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::proxy::Proxy;

/// The runtime currently serving, swapped whole on reload. Each request takes the runtime
/// current when it arrives and keeps it to the end, so a reload never changes the rules
/// under a request in flight.
pub struct Live {
    current: ArcSwap<Proxy>,
    /// The file to re-read on reload; `None` for configs built in code.
    config_path: Option<PathBuf>,
    /// Fingerprint of the config and key files last loaded (or rejected).
    seen: std::sync::Mutex<u64>,
    /// Counts the swaps, so connections can look at once at what a reload changed.
    swaps: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

/// How often the config and key files are checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

impl Live {
    pub fn new(proxy: Arc<Proxy>) -> Arc<Live> {
        let path = PathBuf::from(&proxy.config().source);
        let config_path = path.is_file().then_some(path);
        let seen = config_path
            .as_deref()
            .map_or(0, |p| fingerprint(p, proxy.config()));
        Arc::new(Live {
            current: ArcSwap::new(proxy),
            config_path,
            seen: std::sync::Mutex::new(seen),
            swaps: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Changes whenever a reload swaps the runtime.
    pub fn swaps(&self) -> tokio::sync::watch::Receiver<u64> {
        self.swaps.subscribe()
    }

    pub fn current(&self) -> Arc<Proxy> {
        self.current.load_full()
    }

    /// Re-reads the config file and swaps in a new runtime; a config that fails to load or
    /// validate is rejected, logged with its reason and counted, and the old one keeps
    /// serving.
    pub fn reload(&self, why: &str) -> bool {
        let Some(path) = &self.config_path else {
            return false;
        };
        let old = self.current();
        let result = Config::load(path)
            .map_err(|e| e.to_string())
            .and_then(|config| {
                let print = fingerprint(path, &config);
                if let Ok(mut seen) = self.seen.lock() {
                    *seen = print;
                }
                old.reload(config).map_err(|e| format!("{e:#}"))
            });
        match result {
            Ok((proxy, warnings)) => {
                for w in warnings {
                    tracing::warn!("{w}");
                }
                proxy.set_serving(true);
                self.current.store(Arc::new(proxy));
                self.swaps.send_modify(|n| *n += 1);
                old.note_reload(true);
                tracing::info!(why, config = %path.display(), "configuration reloaded");
                true
            }
            Err(reason) => {
                old.note_reload(false);
                tracing::error!(why, %reason, "configuration reload rejected; the previous configuration keeps serving");
                false
            }
        }
    }

    /// Reloads when the config file or a key file changed since the last (attempted) load.
    fn reload_if_changed(&self) {
        let Some(path) = &self.config_path else {
            return;
        };
        let now = fingerprint(path, self.current().config());
        let changed = self.seen.lock().map(|seen| *seen != now).unwrap_or(false);
        if changed {
            self.reload("file change");
            if let Ok(mut seen) = self.seen.lock() {
                // Even a rejected change is not retried until the files change again.
                *seen = now;
            }
        }
    }
}

/// A hash of the config file's bytes and each key file's bytes: what a reload would read.
fn fingerprint(config_path: &Path, config: &Config) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(config_path).unwrap_or_default().hash(&mut h);
    for key in &config.keys {
        match &key.source {
            crate::config::KeySource::File(p) => std::fs::read(p).unwrap_or_default().hash(&mut h),
            // A rotated HSM PIN file is a change too.
            crate::config::KeySource::Pkcs11(crate::config::Pkcs11Source {
                pin: crate::config::PinSource::File(p),
                ..
            }) => std::fs::read(p).unwrap_or_default().hash(&mut h),
            _ => {}
        }
    }
    // A rotated inbound certificate is a change too.
    crate::tls::fingerprint(config).hash(&mut h);
    h.finish()
}

/// SIGHUP → reload the configuration and re-open the audit log (logrotate); and every
/// `WATCH_INTERVAL`, reload when the config or key files changed (ConfigMap updates).
pub async fn watch(live: Arc<Live>) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(unix)]
    if hup.is_none() {
        tracing::warn!("cannot watch SIGHUP: reload by editing the config file instead");
    }
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = hangup => {
                tracing::info!("SIGHUP: reloading the configuration and re-opening the audit log");
                if let Some(audit) = live.current().audit() {
                    audit.reopen();
                }
                let live = live.clone();
                let _ = tokio::task::spawn_blocking(move || live.reload("SIGHUP")).await;
            }
            _ = tick.tick() => {
                let live = live.clone();
                let _ = tokio::task::spawn_blocking(move || live.reload_if_changed()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_swaps_the_runtime_and_drops_the_replaced_one_when_nothing_holds_it() {
        let dir = std::env::temp_dir().join(format!("aap-runtime-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("proxy.toml");
        let text =
            "[server]\nallow_anonymous = true\nadmin_listen = \"off\"\n[audit]\npath = \"-\"\n";
        std::fs::write(&path, text).unwrap();
        let (proxy, _) = Proxy::new(Config::load(&path).unwrap()).unwrap();
        let live = Live::new(Arc::new(proxy));
        let first = Arc::downgrade(&live.current());
        // A request in flight keeps the runtime it started with.
        let in_flight = live.current();
        std::fs::write(&path, format!("{text}# edited\n")).unwrap();
        assert!(live.reload("test"));
        assert!(!Arc::ptr_eq(&in_flight, &live.current()), "swapped");
        assert!(first.upgrade().is_some(), "kept while a request holds it");
        drop(in_flight);
        assert!(first.upgrade().is_none(), "dropped with its last request");
        // A broken config is rejected and the current runtime keeps serving.
        let second = Arc::downgrade(&live.current());
        std::fs::write(&path, "[server]\nallow_anonymus = true\n").unwrap();
        assert!(!live.reload("test"));
        assert!(Arc::ptr_eq(&second.upgrade().unwrap(), &live.current()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
