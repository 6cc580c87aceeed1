//! Test certificates and tokens, made at test time with rcgen (no committed keys, no
//! openssl needed where the tests run, e.g. inside the nested rig).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA, a server certificate for `localhost` and `127.0.0.1` signed by it, a client
/// certificate signed by it, and a client certificate from another CA (a stranger).
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>, String> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    CertifiedIssuer::self_signed(params, key).map_err(|e| e.to_string())
}

fn leaf(
    dir: &Path,
    name: &str,
    sans: &[&str],
    issuer: &CertifiedIssuer<'static, KeyPair>,
) -> Result<(PathBuf, PathBuf), String> {
    let params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .map_err(|e| e.to_string())?;
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.signed_by(&key, issuer).map_err(|e| e.to_string())?;
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    write_private(&c, &cert.pem())?;
    write_private(&k, &key.serialize_pem())?;
    Ok((c, k))
}

impl Pki {
    /// Makes everything in `dir`.
    pub fn make(dir: &Path) -> Result<Pki, String> {
        let root = ca("microvm test CA")?;
        let other = ca("another CA")?;
        let ca = dir.join("ca.pem");
        write_private(&ca, &root.pem())?;
        let (server_cert, server_key) = leaf(dir, "server", &["localhost", "127.0.0.1"], &root)?;
        let (client_cert, client_key) = leaf(dir, "client", &["client"], &root)?;
        let (stranger_cert, stranger_key) = leaf(dir, "stranger", &["client"], &other)?;
        Ok(Pki {
            ca,
            server_cert,
            server_key,
            client_cert,
            client_key,
            stranger_cert,
            stranger_key,
        })
    }
}

/// Writes a token file (mode 0600) and returns its path.
pub fn token(dir: &Path, name: &str, secret: &str) -> Result<PathBuf, String> {
    let p = dir.join(name);
    write_private(&p, &format!("{secret}\n"))?;
    Ok(p)
}

/// What a web page could make a browser send to a console port: curl POSTing the
/// command `echo pwned` to `url` (`ca`: the CA to trust, for https). The caller checks
/// the reply and that nothing reached the guest.
pub fn curl_post_pwned(url: &str, ca: Option<&Path>) -> std::process::Output {
    let mut curl = std::process::Command::new("curl");
    curl.args([
        "-sS",
        "-m",
        "20",
        "-X",
        "POST",
        "--data-binary",
        "echo pwned",
        url,
    ]);
    if let Some(ca) = ca {
        curl.arg("--cacert").arg(ca);
    }
    curl.output().expect("curl (scripts/deps.sh installs it)")
}
