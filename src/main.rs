//! The `apple-api-proxy` binary: command line, logging setup, exit codes. Everything else is
//! in the library, except the `demo` command's wiring of the Apple stand-in ([`demo`]),
//! which the library must not depend on; `anyhow` lives only here.
//!
//! Exit codes: 0 success, 1 a failure the message explains, 2 bad command-line usage.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context as _};
use clap::{Parser, Subcommand};

use apple_api_proxy::config::Config;
use apple_api_proxy::proxy::Proxy;
use apple_api_proxy::{apple, client, config, route, server, token};

mod demo;

#[derive(Parser)]
#[command(
    name = "apple-api-proxy",
    version,
    about = "Authenticating reverse proxy for Apple's server APIs: mints an ES256 JWT per request; keys never leave this host."
)]
struct Cli {
    /// The configuration file (default proxy.toml; `explain` uses it only when given).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log format for operational logs: text or json (default: [log] format, else text).
    /// `RUST_LOG` sets the filter (default: [log] filter, else info).
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of one log or a rotated series (oldest first); exit 1 naming
    /// the first bad line.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A head recorded elsewhere (`GET /audit/head`, the operational log's `audit head`
        /// line): exit 1 unless the log holds line SEQ with that SHA-256.
        #[arg(long, value_name = "SEQ:SHA256")]
        head: Option<String>,
    },
    /// Summarise logs for a reviewer: use per client × key × API, signatures, markers; a
    /// rotated series and several replicas' logs at once, any order; exit 1 on a broken chain.
    Report {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Only records at or after this time (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Only records before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// text (tables), json (one object, DESIGN §19) or csv (the rows).
        #[arg(long, default_value = "text", value_parser = ["text", "json", "csv"])]
        format: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Store a downloaded .p8 in a PKCS#11 token (an HSM, SoftHSM2, a cloud KMS's PKCS#11
    /// library) as a sensitive, non-extractable, sign-only key, and print its config line.
    Import {
        /// The .p8 (PKCS#8 or SEC1 PEM, as for private_key_file).
        file: PathBuf,
        /// The PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so.
        #[arg(long)]
        module: PathBuf,
        /// The label of the (initialised) token to store the key in.
        #[arg(long)]
        token_label: String,
        /// The label to give the key objects (must be free on the token), e.g. AuthKey_2X9R4HXF34.
        #[arg(long)]
        key_label: String,
        /// The environment variable holding the token's user PIN.
        #[arg(
            long,
            conflicts_with = "pin_file",
            required_unless_present = "pin_file"
        )]
        pin_env: Option<String>,
        /// A file holding the token's user PIN.
        #[arg(long)]
        pin_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Serve,
    /// Validate config and keys, test-sign with each key, print the route/key/client tables.
    Check,
    /// Print a JWT for one request, e.g. --request "GET /v1/apps" (for curl).
    Token {
        /// The key's name in config; default: the first key that serves the request's API.
        #[arg(long)]
        key: Option<String>,
        /// "METHOD /path[?query]" exactly as it will be sent to Apple.
        #[arg(long)]
        request: String,
    },
    /// Decode a JWT (argument or stdin) and list every Apple rule it breaks; no key needed.
    /// With --config, also checks kid/iss against the configured keys and the signature.
    Explain {
        /// The token (with or without "Bearer "); read from stdin when absent.
        token: Option<String>,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print a new client secret and the config lines holding its hash.
    ClientSecret {
        /// The client's name.
        name: String,
    },
    /// Make a client key (DESIGN §17b) for an Apple SDK or APNs library: writes the private
    /// key for the client and prints the [[clients]] lines with the public key.
    ClientKey {
        /// The client's name.
        name: String,
        /// Where to write the private key (default: AuthKey_<KEY ID>.p8 here); never
        /// overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Keys in an HSM (DESIGN §16).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Start a local Apple stand-in with the proxy in front of it and print curl commands.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let demo = matches!(cli.command, Some(Command::Demo { .. }));
    // `serve` takes its log settings from the config file when it has one.
    let from_config = match cli.command {
        None | Some(Command::Serve) => Config::load(
            cli.config
                .as_deref()
                .unwrap_or(std::path::Path::new("proxy.toml")),
        )
        .ok()
        .map(|c| c.log),
        _ => None,
    };
    let format = cli
        .log_format
        .clone()
        .or_else(|| from_config.as_ref().map(|l| l.format.clone()))
        .unwrap_or_else(|| "text".to_string());
    let filter = from_config.map(|l| l.filter).unwrap_or_else(|| {
        if demo {
            "info,apple_standin=debug"
        } else {
            "info"
        }
        .to_string()
    });
    init_tracing(&format, &filter);
    let command = cli.command.unwrap_or(Command::Serve);
    match run(command, cli.config.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(format: &str, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colour only on a terminal: a log file or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(command: Command, given: Option<&std::path::Path>) -> anyhow::Result<()> {
    let config = given.unwrap_or(std::path::Path::new("proxy.toml"));
    match command {
        Command::Serve => serve(config),
        Command::Check => check(config),
        Command::Token { key, request } => print_token(config, key.as_deref(), &request),
        Command::ClientSecret { name } => client_secret(&name),
        Command::ClientKey { name, out } => client_key(&name, out.as_deref()),
        Command::Explain { token } => explain(token, given),
        Command::Audit {
            command: AuditCommand::Verify { files, head },
        } => audit_verify(&files, head.as_deref()),
        Command::Audit {
            command:
                AuditCommand::Report {
                    files,
                    since,
                    until,
                    format,
                },
        } => audit_report(&files, since.as_deref(), until.as_deref(), &format),
        Command::Key {
            command:
                KeyCommand::Import {
                    file,
                    module,
                    token_label,
                    key_label,
                    pin_env,
                    pin_file,
                },
        } => key_import(
            &file,
            config::Pkcs11Source {
                module,
                token_label,
                key_label,
                pin: match (pin_env, pin_file) {
                    (Some(var), _) => config::PinSource::Env(var),
                    (None, Some(file)) => config::PinSource::File(file),
                    (None, None) => bail!("give --pin-env VAR or --pin-file FILE"),
                },
                sessions: 1,
            },
        ),
        Command::Demo { listen } => run_demo(listen),
    }
}

fn key_import(file: &std::path::Path, target: config::Pkcs11Source) -> anyhow::Result<()> {
    for (flag, value) in [
        ("--token-label", &target.token_label),
        ("--key-label", &target.key_label),
    ] {
        if value.trim().is_empty() {
            bail!("{flag} is empty: give the label of the token, and a free label for the key (e.g. AuthKey_<KEY ID>)");
        }
    }
    // The printed line must mean the same from the config's directory as from here.
    let absolute = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let pin = match &target.pin {
        config::PinSource::File(p) => config::PinSource::File(absolute(p)),
        other => other.clone(),
    };
    let target = config::Pkcs11Source {
        module: absolute(&target.module),
        pin,
        ..target
    };
    let (secret, warnings) = token::key::load_secret(&config::KeySource::File(file.to_path_buf()))?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let imported = token::pkcs11::import(&secret, &target)?;
    drop(secret);
    let toml = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let pin = match &target.pin {
        config::PinSource::Env(var) => format!("pin_env = {}", toml(var)),
        config::PinSource::File(path) => {
            format!("pin_file = {}", toml(&path.display().to_string()))
        }
    };
    println!(
        "# Imported {} into token `{}` as `{}`: private key sensitive={}, extractable={}, sign-only; public key object beside it; a test signature verified.",
        file.display(),
        target.token_label,
        target.key_label,
        imported.sensitive,
        imported.extractable
    );
    println!(
        "# Public key SHA-256: {}",
        apple_api_proxy::hex(&apple_api_proxy::sha256(&imported.public_key))
    );
    println!("# In proxy.toml, replace this key's private_key_file / private_key_env with:");
    println!(
        "pkcs11 = {{ module = {}, token_label = {}, key_label = {}, {pin} }}",
        toml(&target.module.display().to_string()),
        toml(&target.token_label),
        toml(&target.key_label)
    );
    println!("# Then run `apple-api-proxy check`, and delete {} and every copy of it: the token holds the only one the proxy needs.", file.display());
    Ok(())
}

fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    runtime()?.block_on(async {
        let listener = server::bind(&config).await.with_context(|| {
            format!(
                "{}: cannot listen on {} or {} (fields server.listen, server.admin_listen)",
                config.source,
                config.server.listen,
                config
                    .server
                    .admin_listen
                    .map_or("-".to_string(), |a| a.to_string())
            )
        })?;
        server::run(config, listener, shutdown_signal()).await?;
        Ok(())
    })
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the proxy");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    // The very checks `serve` runs at start-up (keys, TLS files, CA files, deployment
    // rules), so `check` never passes a configuration `serve` would refuse.
    let (proxy, warnings) = Proxy::new(Config::load(path)?)?;
    let config = proxy.config();
    let minter = proxy.minter();
    println!("config {}: OK", config.source);
    println!("\nKEYS");
    // Apple Business/School Manager key ids are UUIDs: the column fits the longest.
    let id_width = config
        .keys
        .iter()
        .map(|k| k.key_id.len() + 1)
        .max()
        .unwrap_or(0)
        .max(11);
    println!(
        "  {:<14} {:<16} {:<id_width$} {:<9} {:<10} {:<27} APIS",
        "NAME", "KIND", "KEY ID", "LIFETIME", "TEST-SIGN", "BACKEND"
    );
    for k in &config.keys {
        let selftest = minter.self_test(&k.name);
        let custody = match minter.custody(&k.name) {
            Some((backend, Some(false))) => format!("{} non-extractable", backend.as_str()),
            Some((backend, Some(true))) => format!("{} exportable", backend.as_str()),
            Some((backend, None)) => format!("{} (extractable?)", backend.as_str()),
            None => "-".into(),
        };
        println!(
            "  {:<14} {:<16} {:<id_width$} {:<9} {:<10} {:<27} {}",
            k.name,
            k.kind.id(),
            k.key_id,
            humantime::format_duration(k.token_lifetime).to_string(),
            if selftest.is_ok() { "ok" } else { "FAILED" },
            custody,
            k.apis.iter().map(|a| a.id()).collect::<Vec<_>>().join(", ")
        );
        selftest.map_err(|e| anyhow!("{}: key `{}`: {e}", config.source, k.name))?;
    }
    for k in config
        .keys
        .iter()
        .filter(|k| k.kind == apple::KeyKind::Developer)
    {
        let renewals: Vec<String> = k
            .apis
            .iter()
            .map(|api| match api.token_strategy() {
                apple::TokenStrategy::Exchanged => {
                    format!("{} by exchange, renewed before Apple's expiry", api.id())
                }
                apple::TokenStrategy::FormSecret => format!(
                    "{} every {} per client id ({})",
                    api.id(),
                    humantime::format_duration(
                        k.client_secret_lifetime
                            .saturating_sub(std::time::Duration::from_secs(60))
                    ),
                    k.client_ids.join(", ")
                ),
                _ => {
                    let every =
                        token::developer_renewal(*api, k.apns_token_refresh, k.token_lifetime);
                    format!("{} every {}", api.id(), humantime::format_duration(every))
                }
            })
            .collect();
        println!(
            "  {}: one token per API, reused and renewed: {}",
            k.name,
            renewals.join(", ")
        );
    }
    println!("\nROUTES");
    println!("  {:<18} {:<11} {:<44} KEY", "API", "ENV", "UPSTREAM");
    let table = route::Table::new(config);
    for (api, env, upstream) in table.rows() {
        let key = config
            .default_key_for(api)
            .map_or("(none: requests get 404)", |k| k.name.as_str());
        println!(
            "  {:<18} {:<11} {:<44} {key}",
            api.id(),
            env.as_str(),
            upstream.base
        );
    }
    let signing_keys: Vec<&str> = config
        .keys
        .iter()
        .filter(|k| k.apis.contains(&apple::Api::InAppSigning))
        .map(|k| k.name.as_str())
        .collect();
    println!(
        "  {:<18} {:<11} {:<44} {}",
        apple::Api::InAppSigning.id(),
        "-",
        "(answered by the proxy: /proxy/v1/signatures/*)",
        if signing_keys.is_empty() {
            "(none: requests get 404)".to_string()
        } else {
            signing_keys.join(", ")
        }
    );
    println!("\nCLIENTS");
    if config.server.allow_anonymous {
        println!("  anonymous          allowed (server.allow_anonymous = true): every route, audited as `anonymous`");
    }
    for c in &config.clients {
        let mut auth = Vec::new();
        if c.secret_sha256.is_some() {
            auth.push("secret".to_string());
        }
        if let Some(k) = &c.client_key {
            auth.push(format!("client-key:{}", k.key_id));
        }
        if let Some(subject) = &c.tls_subject {
            auth.push(format!("mTLS:{subject}"));
        }
        if let Some(id) = &c.identity {
            let provider = &config.identity_providers[id.provider].name;
            let claims: Vec<String> = id.claims.iter().map(|(k, v)| format!("{k}={v}")).collect();
            auth.push(format!("oidc:{provider}[{}]", claims.join(",")));
        }
        println!(
            "  {:<18} {:<22} key={:<10} allow: {}",
            c.name,
            auth.join(","),
            c.key.as_deref().unwrap_or("(default)"),
            if c.allow.is_empty() {
                "(nothing: default deny)".to_string()
            } else {
                c.allow.join(", ")
            }
        );
    }
    if !config.identity_providers.is_empty() {
        println!("\nIDENTITY PROVIDERS");
        let fetched = runtime()?.block_on(async {
            let mut out = Vec::new();
            for p in proxy.identity_providers() {
                out.push(p.fetch().await.map(|()| p.keys().0));
            }
            out
        });
        for (p, keys) in config.identity_providers.iter().zip(fetched) {
            let state = match keys {
                Ok(Some(set)) => {
                    let mut kids: Vec<&str> = set.keys.keys().map(String::as_str).collect();
                    kids.sort_unstable();
                    format!("keys: {}", kids.join(", "))
                }
                Ok(None) => "keys: none".to_string(),
                Err(e) => format!("KEYS UNAVAILABLE (its clients would get 503): {e}"),
            };
            println!(
                "  {:<18} {} aud={} max_token_age={}\n  {:<18} {state}",
                p.name,
                p.issuer,
                p.audience,
                humantime::format_duration(p.max_token_age),
                ""
            );
        }
    }
    println!("\nSIGNING (in-app signatures; a client without [clients.signing] signs nothing)");
    let mut any = false;
    for c in &config.clients {
        let Some(p) = &c.signing else { continue };
        any = true;
        let list = |v: &[String]| {
            if v.is_empty() {
                "(none)".to_string()
            } else {
                v.join(", ")
            }
        };
        println!("  {}", c.name);
        println!("    products:   {}", list(&p.products));
        println!("    offers:     {}", list(&p.offers));
        println!(
            "    introductory offers: {}",
            if p.grant_introductory_offer {
                "may grant (allow_introductory_offer = true)"
            } else {
                "may only deny (allow_introductory_offer = false)"
            }
        );
        println!("    advanced commerce operations: {}", list(&p.operations));
        if !p.operations.is_empty() {
            println!(
                "    currencies: {}   max price: {}",
                p.currencies.as_deref().map_or("(any)".to_string(), list),
                p.max_price.map_or("-".to_string(), |m| m.to_string())
            );
        }
        let callable: Vec<&str> = apple::SignatureKind::ALL
            .iter()
            .map(|k| k.id())
            .filter(|id| {
                let path = format!("/proxy/v1/signatures/{id}");
                c.allow.iter().any(|rule| rule_reaches(rule, &path))
            })
            .collect();
        println!(
            "    endpoints its allow rules reach: {}",
            if callable.is_empty() {
                "(none: add \"POST /proxy/v1/signatures/*\" to allow)".to_string()
            } else {
                callable.join(", ")
            }
        );
    }
    if !any {
        println!("  (no client may sign)");
    }
    if !warnings.is_empty() {
        println!("\nWARNINGS");
        for w in &warnings {
            println!("  - {w}");
        }
    }
    Ok(())
}

/// Whether an allow rule (`METHOD /glob`) lets a POST reach `path`.
fn rule_reaches(rule: &str, path: &str) -> bool {
    let mut parts = rule.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(method), Some(glob)) => {
            (method == "*" || method == "POST") && apple_api_proxy::client::glob_match(glob, path)
        }
        _ => false,
    }
}

fn print_token(path: &std::path::Path, key: Option<&str>, request: &str) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let (method, target) = request.trim().split_once(' ').ok_or_else(|| {
        anyhow!("--request must be \"METHOD /path[?query]\", e.g. \"GET /v1/apps\"")
    })?;
    let method = method.to_ascii_uppercase();
    let (path_part, query) = match target.trim().split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target.trim(), None),
    };
    route::check_path(path_part).map_err(|e| anyhow!("--request: {e}"))?;
    let table = route::Table::new(&config);
    let route = table.resolve(path_part).map_err(|e| {
        anyhow!(
            "--request: {e}; known prefixes: {}",
            route::known_prefixes().join(", ")
        )
    })?;
    let key = match key {
        Some(k) => config.key(k).ok_or_else(|| {
            anyhow!(
                "{}: no key named `{k}` (fix: use a name from [[keys]])",
                config.source
            )
        })?,
        None => config.default_key_for(route.api).ok_or_else(|| {
            anyhow!(
                "{}: no key serves {} (fix: add it to a key's apis)",
                config.source,
                route.api
            )
        })?,
    };
    if !key.apis.contains(&route.api) {
        bail!(
            "key `{}` does not sign for {} (its apis: {})",
            key.name,
            route.api,
            key.apis
                .iter()
                .map(|a| a.id())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if matches!(
        route.api.token_strategy(),
        apple::TokenStrategy::Exchanged | apple::TokenStrategy::FormSecret
    ) {
        bail!(
            "{} takes a credential the proxy makes per exchange or form (DESIGN §18); `token` prints none — send the request through the proxy",
            route.api
        );
    }
    let (minter, warnings) = token::Minter::new(&config, Arc::new(token::AppleClock::default()))?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let t = minter.token(
        &token::Request {
            key: &key.name,
            api: route.api,
            method: &method,
            path: route.path,
            query,
            bundle_id: None,
            subject: None,
        },
        SystemTime::now(),
    )?;
    if route.environment == apple::Environment::Sandbox {
        eprintln!("note: send it to {}{}", route.upstream.base, route.path);
    }
    println!("{}", t.jwt());
    Ok(())
}

fn explain(token: Option<String>, config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let token = match token {
        Some(t) => t,
        None => {
            let mut t = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut t)
                .context("reading the token from stdin")?;
            t
        }
    };
    let now = token::unix_secs(SystemTime::now());
    let report = apple_api_proxy::explain::explain(&token, now);
    let mut problems = report.problems.clone();
    println!("header: {}", report.header);
    println!("claims: {}", report.claims);
    let config = config.map(Config::load).transpose()?;
    // An identity token (DESIGN §17) is a client's credential, verified against its
    // provider's keys, fetched now.
    if let Some(config) = &config {
        if let Some(done) = explain_identity(config, &token, now)? {
            return done;
        }
    }
    // A JWT signed with a client key (DESIGN §17b) is the client's credential, not an Apple
    // token: only §17b's rules apply to it.
    if let Some(config) = &config {
        let bare = token.trim().trim_start_matches("Bearer ").trim();
        let kid = client::key::kid_of(bare).unwrap_or_default();
        if let Some(c) = config
            .clients
            .iter()
            .find(|c| c.client_key.as_ref().is_some_and(|k| k.key_id == kid))
        {
            let public = c
                .client_key
                .as_ref()
                .map(|k| k.public_key.as_slice())
                .unwrap_or_default();
            println!("kind:   client-key JWT: kid \"{kid}\" is client `{}`'s key id (DESIGN §17b); Apple never sees it", c.name);
            return match client::key::verify(bare, public, now) {
                Ok(_) => {
                    println!("\nOK: authenticates client `{}`", c.name);
                    Ok(())
                }
                Err(check) => {
                    println!("\ndoes not authenticate client `{}`: {check}", c.name);
                    std::process::exit(1);
                }
            };
        }
    }
    match (report.api, report.in_app) {
        (_, Some(kind)) => println!(
            "api:    in-app signature, {} form — its aud is \"{}\": made with an In-App Purchase key and handed to StoreKit (APPLE.md §8)",
            kind.id(),
            kind.audience().unwrap_or_default()
        ),
        (Some((family, why)), None) => println!(
            "api:    {} — {why}",
            apple_api_proxy::explain::family_apis(family).join(" / ")
        ),
        (None, None) => println!("api:    unknown"),
    }
    for note in &report.notes {
        println!("note:   {note}");
    }
    if let Some(config) = &config {
        let (minter, _) = token::Minter::new(config, Arc::new(token::AppleClock::default()))?;
        let kid = report
            .header
            .get("kid")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        match config.keys.iter().find(|k| k.key_id == kid) {
            None => problems.push(format!(
                "kid \"{kid}\" is none of the configured keys' key_id"
            )),
            Some(k) => {
                println!(
                    "key:    `{}` ({}) from {}",
                    k.name,
                    k.kind.id(),
                    config.source
                );
                if report.in_app.is_some() {
                    if k.kind != apple::KeyKind::InAppPurchase {
                        problems.push(format!(
                            "key `{}` is a {} key; in-app signatures are made with an In-App Purchase key",
                            k.name,
                            k.kind.id()
                        ));
                    }
                    let bid = report.claims.get("bid").and_then(|v| v.as_str());
                    if bid.is_some() && k.bundle_id.as_deref() != bid {
                        problems.push(format!(
                            "bid {:?} differs from key `{}`'s bundle_id {:?}",
                            bid.unwrap_or(""),
                            k.name,
                            k.bundle_id.as_deref().unwrap_or("")
                        ));
                    }
                }
                let iss = report.claims.get("iss").and_then(|v| v.as_str());
                let (field, expected) = match k.kind {
                    apple::KeyKind::Developer => ("team_id", k.team_id.as_deref()),
                    _ => ("issuer_id", k.issuer_id.as_deref()),
                };
                if expected != iss {
                    problems.push(format!(
                        "iss {:?} differs from key `{}`'s {field} {:?}",
                        iss.unwrap_or(""),
                        k.name,
                        expected.unwrap_or("(none: individual key)")
                    ));
                }
                let public = minter.public_key(&k.name).unwrap_or_default();
                if !apple_api_proxy::explain::signature_verifies(&token, public) {
                    problems.push(format!("the signature does not verify with key `{}`: it was not signed by this key, or the token was altered", k.name));
                } else {
                    println!("note:   signature verifies with key `{}`", k.name);
                }
            }
        }
    }
    if problems.is_empty() {
        println!(
            "\nOK: breaks none of the rules the proxy knows (APPLE.md {})",
            if report.in_app.is_some() {
                "§8"
            } else {
                "§2"
            }
        );
        Ok(())
    } else {
        println!("\nbreaks {} rule(s):", problems.len());
        for p in &problems {
            println!("  - {p}");
        }
        std::process::exit(1);
    }
}

/// `explain --config` on an identity token: fetches its provider's keys, verifies it by
/// DESIGN §17 and says which client it is. `None` when the token's `iss` is no provider's.
fn explain_identity(
    config: &Config,
    token: &str,
    now: i64,
) -> anyhow::Result<Option<anyhow::Result<()>>> {
    let bare = token.trim().trim_start_matches("Bearer ").trim();
    let Some(iss) = apple_api_proxy::identity::verify::issuer_of(bare) else {
        return Ok(None);
    };
    let Some(p) = config
        .identity_providers
        .iter()
        .position(|p| p.issuer == iss)
    else {
        return Ok(None);
    };
    let provider = &config.identity_providers[p];
    println!(
        "kind:   identity token: iss is identity provider `{}`'s issuer (DESIGN §17); Apple never sees it",
        provider.name
    );
    let clients = client::Clients::new(config)?;
    let Some(keys) = clients.identity_providers().nth(p) else {
        return Ok(None);
    };
    runtime()?.block_on(keys.fetch()).map_err(|e| {
        anyhow!(
            "cannot fetch identity provider `{}`'s keys: {e}",
            provider.name
        )
    })?;
    let (Some(set), _) = keys.keys() else {
        return Err(anyhow!("identity provider `{}` has no keys", provider.name));
    };
    let rules = apple_api_proxy::identity::Rules {
        issuer: &provider.issuer,
        audience: &provider.audience,
        max_token_age_secs: i64::try_from(provider.max_token_age.as_secs()).unwrap_or(i64::MAX),
    };
    match apple_api_proxy::identity::verify::verify(bare, &set, &rules, now) {
        Err(check) => {
            println!("\ndoes not verify: {check}");
            std::process::exit(1);
        }
        Ok(v) => {
            println!(
                "note:   verifies with key {:?}; subject {:?}",
                v.kid, &*v.subject
            );
            match clients.identity_client(p, &v.claims) {
                Some(name) => {
                    println!("\nOK: authenticates client `{name}` (the first whose identity claims match)");
                    Ok(Some(Ok(())))
                }
                None => {
                    println!("\nverifies, but matches no client's identity claims: the proxy answers 403");
                    std::process::exit(1);
                }
            }
        }
    }
}

fn audit_verify(files: &[PathBuf], head: Option<&str>) -> anyhow::Result<()> {
    let head = head
        .map(|h| {
            let (seq, sha) = h.split_once(':')?;
            let seq: u64 = seq.trim().parse().ok()?;
            let sha = sha.trim().to_ascii_lowercase();
            (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit())).then_some((seq, sha))
        })
        .map(|parsed| {
            parsed.ok_or_else(|| anyhow!("--head must be SEQ:SHA256, e.g. 1042:3f1c…(64 hex digits), as GET /audit/head reports it"))
        })
        .transpose()?;
    match apple_api_proxy::audit::verify::verify_files(files) {
        Ok(summary) => {
            for note in &summary.notes {
                println!("note: {note}");
            }
            println!(
                "OK: {} record(s) in {} file(s), seq {}..{}; last line's sha256 {}",
                summary.lines,
                summary.files,
                summary.first_seq.map_or("-".to_string(), |s| s.to_string()),
                summary.last_seq.map_or("-".to_string(), |s| s.to_string()),
                summary.last_sha256.as_deref().unwrap_or("-")
            );
            if let Some((seq, sha)) = head {
                match apple_api_proxy::audit::verify::line_sha256(files, seq) {
                    Ok(Some(found)) if found == sha => {
                        println!("OK: head {seq}:{sha} is in the log");
                    }
                    Ok(Some(found)) => {
                        println!("head mismatch: line seq {seq} hashes to {found}, not the recorded head's {sha}: the log's tail was rewritten after the head was recorded");
                        std::process::exit(1);
                    }
                    Ok(None) => {
                        println!(
                            "head missing: the log has no line seq {seq} (its last is seq {}): lines were cut from its tail after the head was recorded",
                            summary.last_seq.map_or("-".to_string(), |s| s.to_string())
                        );
                        std::process::exit(1);
                    }
                    Err(failure) => {
                        println!("{failure}");
                        std::process::exit(1);
                    }
                }
            }
            Ok(())
        }
        Err(failure) => {
            println!("{failure}");
            std::process::exit(1);
        }
    }
}

fn audit_report(
    files: &[PathBuf],
    since: Option<&str>,
    until: Option<&str>,
    format: &str,
) -> anyhow::Result<()> {
    use apple_api_proxy::audit::report;
    // Bounds become the records' own format, so that times compare as strings.
    let bound = |flag: &str, v: Option<&str>| {
        v.map(|v| {
            humantime::parse_rfc3339_weak(v.trim())
                .map(apple_api_proxy::rfc3339_millis)
                .map_err(|e| {
                    anyhow!("{flag} {v:?} is not an RFC 3339 time ({e}), e.g. 2026-11-01T00:00:00Z")
                })
        })
        .transpose()
    };
    let period = report::Period {
        since: bound("--since", since)?,
        until: bound("--until", until)?,
    };
    let r = report::report(files, &period)?;
    let mut out = std::io::stdout().lock();
    match format {
        "json" => {
            serde_json::to_writer_pretty(&mut out, &r)?;
            std::io::Write::write_all(&mut out, b"\n")?;
        }
        "csv" => report::write_csv(&r, &mut out)?,
        _ => report::write_text(&r, &mut out)?,
    }
    std::io::Write::flush(&mut out)?;
    if !r.chain_ok() {
        eprintln!("error: the audit chain is {}", r.chain);
        std::process::exit(1);
    }
    Ok(())
}

fn client_secret(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.contains(['"', '\\', '\n']) {
        bail!("the client name must be non-empty and contain no quotes, backslashes or newlines");
    }
    let secret = client::generate_secret()
        .map_err(|_| anyhow!("the system random number generator failed"))?;
    let hash = apple_api_proxy::hex(&apple_api_proxy::sha256(secret.as_bytes()));
    println!("# Secret for client `{name}` — give it to the client; it is shown only once and the proxy stores only its hash.");
    println!("# The client sends it as `Proxy-Authorization: Bearer <secret>` or `Authorization: Bearer <secret>`.");
    println!("{secret}");
    println!();
    println!("# Add to proxy.toml (edit the allow rules):");
    println!("[[clients]]");
    println!("name = \"{name}\"");
    println!("secret_sha256 = \"{hash}\"");
    println!("allow = [\"GET /v1/*\"]");
    Ok(())
}

fn client_key(name: &str, out: Option<&std::path::Path>) -> anyhow::Result<()> {
    if name.is_empty() || name.contains(['"', '\\', '\n']) {
        bail!("the client name must be non-empty and contain no quotes, backslashes or newlines");
    }
    let issued = client::key::issue()?;
    let path = out
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("AuthKey_{}.p8", issued.key_id)));
    let mut file = {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&path).with_context(|| {
            format!(
                "writing the private key to {} (an existing file is never overwritten)",
                path.display()
            )
        })?
    };
    std::io::Write::write_all(&mut file, issued.private_pem.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing the private key to {}", path.display()))?;
    println!(
        "# Client key for client `{name}`: the private key is in {} (mode 0600).",
        path.display()
    );
    println!("# Give that file and the key id {} to the client's SDK as its .p8 and key id; the proxy keeps no copy.", issued.key_id);
    println!("# It is worthless at Apple: the proxy accepts the SDK's JWT as this client and signs Apple's token itself.");
    println!();
    println!("# Add to proxy.toml (edit the allow rules):");
    println!("[[clients]]");
    println!("name = \"{name}\"");
    println!("key_id = \"{}\"", issued.key_id);
    println!("public_key = \"\"\"");
    print!("{}", issued.public_pem);
    println!("\"\"\"");
    println!("allow = [\"GET /inApps/*\"]");
    Ok(())
}

fn run_demo(listen: SocketAddr) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let d = demo::start(listen).await?;
        println!("apple-api-proxy demo: the proxy is on http://{} in front of a local Apple stand-in", d.addr);
        println!("  (stand-in: App Store Connect {}, App Store Server {} / sandbox {};", d.world.standin.url(apple_standin::Role::AppStoreConnect), d.world.standin.url(apple_standin::Role::StoreKitProduction), d.world.standin.url(apple_standin::Role::StoreKitSandbox));
        println!("   it checks every token with its own verifier, as Apple would; keys, CA and proxy.toml are throw-away, in {}, removed on exit)", d.world.dir.path().display());
        println!();
        for (what, line) in d.examples() {
            println!("# {what}");
            println!("{line}");
            println!();
        }
        println!("Press Ctrl-C to stop. Each request's audit record (one hash-chained JSON line) prints below when it ends.");
        let demo::Demo { world, config, listeners, .. } = d;
        // What `serve` runs, on the config the fixture wrote.
        let served = server::run(config, listeners, shutdown_signal()).await;
        world.standin.shutdown().await;
        served?;
        Ok(())
    })
}
