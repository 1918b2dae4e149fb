//! `tessera network …`: the network operator's key, the certificates it
//! signs for gateways, and the revocation list (see
//! `tessera_net::admission` for what providers check).
//!
//! The operator key lives in `network.key` of the home folder (owner-only);
//! its public half is the network's identity, carried in certified
//! gateways' tickets (`NODEID@IP:PORT#OPERATOR`). The revocation list lives
//! in `revocations.json` next to it; give it to a gateway with
//! `--revocations` and the gateways spread it on gossip.

use std::path::Path;

use anyhow::Context;
use clap::{Args, Subcommand};
use tessera_core::{now_ms, NodeId};
use tessera_net::admission::{self, Certificate, Revocations};
use tessera_net::node::node_id;

use crate::network::NetworkArgs;

#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Make this network's operator key (network.key in the home folder)
    /// and print its public half; does nothing to an existing key.
    Init(InitArgs),
    /// Sign a certificate for a gateway (`tessera gateway --print-id` shows
    /// its node id) and print it; save it as gateway.cert in that
    /// gateway's home folder, or give it with `--certificate`.
    Certify(CertifyArgs),
    /// Revoke a gateway's certificates: adds it to revocations.json (signed
    /// again, newer than any before); gateways given that file with
    /// `--revocations` spread it, and providers leave the gateway.
    Revoke(RevokeArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    pub network: NetworkArgs,
}

#[derive(Args, Debug)]
pub struct CertifyArgs {
    /// The gateway's node id (64 hex digits).
    pub node: NodeId,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 30.0)]
    pub days: f64,
    /// Write the certificate here instead of printing it.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub network: NetworkArgs,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// The gateway's node id.
    pub node: NodeId,
    #[command(flatten)]
    pub network: NetworkArgs,
}

pub fn run(home: &Path, command: NetworkCommand) -> anyhow::Result<()> {
    match command {
        NetworkCommand::Init(args) => {
            let key = admission::load_or_create_operator_key(home)?;
            println!("{}", node_id(&key.public()));
            eprintln!(
                "network '{}' operator key in {} (keep it secret); certify gateways with \
                 `tessera network certify NODEID`",
                args.network.name,
                home.join("network.key").display()
            );
            Ok(())
        }
        NetworkCommand::Certify(args) => {
            let key = admission::load_operator_key(home)?;
            if !(args.days > 0.0 && args.days <= 3650.0) {
                anyhow::bail!("--days must be between 0 and 3650, got {}", args.days);
            }
            let cert = Certificate::issue(
                &key,
                &args.network.name,
                args.node,
                std::time::Duration::from_secs_f64(args.days * 86_400.0),
            );
            match &args.out {
                Some(path) => crate::process::write_private(path, &cert)?,
                None => println!("{cert}"),
            }
            Ok(())
        }
        NetworkCommand::Revoke(args) => {
            let key = admission::load_operator_key(home)?;
            let operator = node_id(&key.public());
            let path = home.join("revocations.json");
            let mut list = match std::fs::read_to_string(&path) {
                Ok(text) => Revocations::open(&text)
                    .with_context(|| format!("{} is not a revocation list", path.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Revocations {
                    network: args.network.name.clone(),
                    operator,
                    issued_ms: 0,
                    revoked: Vec::new(),
                },
                Err(e) => return Err(e).context(format!("cannot read {}", path.display())),
            };
            if list.operator != operator || list.network != args.network.name {
                anyhow::bail!("{} belongs to another network or operator", path.display());
            }
            if !list.revoked.contains(&args.node) {
                list.revoked.push(args.node);
            }
            if list.revoked.len() > admission::MAX_REVOKED {
                anyhow::bail!(
                    "a revocation list holds at most {} gateways (it travels on gossip); \
                     revoked certificates expire: let the oldest lapse, or start a new network",
                    admission::MAX_REVOKED
                );
            }
            // Newer than any list before, even with a clock set back.
            list.issued_ms = now_ms().max(list.issued_ms + 1);
            crate::process::write_private(&path, &list.sign(&key))?;
            println!("{}", path.display());
            Ok(())
        }
    }
}
