//! Two jobs at build time:
//! - lets the installed or built binary find llama.cpp's shared libraries beside itself
//!   (`$ORIGIN`) or in the packaged library directory, without LD_LIBRARY_PATH;
//! - builds the admin console (`console/`, TypeScript and Vite) and embeds its files, so the
//!   binary serves it with nothing beside it. `npm ci` runs when `console/package-lock.json`
//!   changed since the last install; `ISTHMUS_CONSOLE_DIST=DIR` embeds a console built
//!   elsewhere instead (for hosts without Node.js).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN:$ORIGIN/../lib/isthmus");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    println!("cargo:rerun-if-env-changed=ISTHMUS_CONSOLE_DIST");
    let dist = match std::env::var_os("ISTHMUS_CONSOLE_DIST") {
        Some(dist) => {
            let dist = PathBuf::from(dist);
            println!("cargo:rerun-if-changed={}", dist.display());
            dist
        }
        None => build_console(&manifest.join("console"), &out.join("console")),
    };
    let mut files = Vec::new();
    collect(&dist, &dist, &mut files);
    files.sort();
    if !files.iter().any(|(path, _)| path == "/index.html") {
        fail(&format!(
            "the admin console in {} has no index.html",
            dist.display()
        ));
    }
    let mut source = String::from("pub static ASSETS: &[Asset] = &[\n");
    for (path, file) in &files {
        let _ = writeln!(
            source,
            "    Asset {{ path: {path:?}, content_type: {:?}, bytes: include_bytes!({:?}) }},",
            content_type(path),
            file.display().to_string()
        );
    }
    source.push_str("];\n");
    if let Err(error) = std::fs::write(out.join("console_assets.rs"), source) {
        fail(&format!("writing the console's file list: {error}"));
    }
}

fn build_console(console: &Path, dist: &Path) -> PathBuf {
    for input in [
        "src",
        "index.html",
        "package.json",
        "package-lock.json",
        "tsconfig.json",
        "vite.config.ts",
    ] {
        println!("cargo:rerun-if-changed={}", console.join(input).display());
    }
    let npm = std::env::var("NPM").unwrap_or_else(|_| "npm".to_owned());
    let lock = console.join("package-lock.json");
    let installed = console.join("node_modules/.isthmus-package-lock.json");
    let lock_bytes = std::fs::read(&lock)
        .unwrap_or_else(|error| fail(&format!("reading {}: {error}", lock.display())));
    if std::fs::read(&installed).ok().as_deref() != Some(lock_bytes.as_slice()) {
        run(
            Command::new(&npm)
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(console),
            &npm,
        );
        if let Err(error) = std::fs::write(&installed, &lock_bytes) {
            fail(&format!("writing {}: {error}", installed.display()));
        }
    }
    run(
        Command::new(&npm)
            .args(["run", "--silent", "build", "--", "--outDir"])
            .arg(dist)
            .args(["--emptyOutDir", "--logLevel", "warn"])
            .current_dir(console),
        &npm,
    );
    dist.to_path_buf()
}

fn run(command: &mut Command, npm: &str) {
    match command.status() {
        Ok(status) if status.success() => {}
        Ok(status) => fail(&format!("`{command:?}` failed ({status})")),
        Err(error) => fail(&format!(
            "cannot run `{npm}` ({error}): the admin console needs Node.js 18 or later and npm \
             to build (Debian: apt-get install nodejs npm; scripts/test and scripts/demo install \
             them when run as root), or set ISTHMUS_CONSOLE_DIST to a console built elsewhere"
        )),
    }
}

fn collect(root: &Path, directory: &Path, files: &mut Vec<(String, PathBuf)>) {
    let entries = std::fs::read_dir(directory)
        .unwrap_or_else(|error| fail(&format!("reading {}: {error}", directory.display())));
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(root, &path, files);
        } else if let Ok(relative) = path.strip_prefix(root) {
            let url = format!("/{}", relative.to_string_lossy().replace('\\', "/"));
            files.push((url, path));
        }
    }
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or_default() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" | "map" => "application/json",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}
