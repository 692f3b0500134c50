//! Lets the installed or built binary find llama.cpp's shared libraries beside itself
//! (`$ORIGIN`) or in the packaged library directory, without LD_LIBRARY_PATH.

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN:$ORIGIN/../lib/isthmus");
}
