//! The admin console: the single-page app in `gateway/console/` (TypeScript, built by Vite
//! when the binary is built, see `build.rs`), embedded in the binary and served at `/` on the
//! admin listener. Its files hold no data, so they are served without the admin token; every
//! figure it shows comes from the admin API and `/metrics`, with the operator's token.

/// One embedded file of the console.
#[derive(Debug)]
pub struct Asset {
    /// Its URL path, e.g. `/index.html`, `/assets/index-3f2a1c.js`.
    pub path: &'static str,
    pub content_type: &'static str,
    pub bytes: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/console_assets.rs"));

/// The console's only sources of script, style and data are the admin listener itself;
/// nothing it shows can run as script, and no other site may frame it.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'none'";

/// The file served for a URL path, if it is one of the console's (`/` is `index.html`).
pub fn find(path: &str) -> Option<&'static Asset> {
    let path = if path == "/" { "/index.html" } else { path };
    ASSETS.iter().find(|asset| asset.path == path)
}

/// Whether browsers may keep the file without asking again: Vite names the files under
/// `/assets/` by their content's hash, so a new build gets new names.
pub fn immutable(asset: &Asset) -> bool {
    asset.path.starts_with("/assets/")
}

#[cfg(test)]
mod tests;
