//! Link setting for the two C libraries rowshift embeds.
//!
//! librdkafka (the kafka transport) and libpg_query (`migrate lint`) both
//! vendor xxHash and export its symbols (`XXH32`, `XXH64`, ...), so a
//! static link sees each defined twice. The copies are xxHash 0.6.5 and
//! 0.8.0, whose XXH32/XXH64 results are fixed by the xxHash specification
//! and whose state structs have the same layout, so either definition
//! serves both libraries: let the linker keep the first.
fn main() {
    println!("cargo:rustc-link-arg=-Wl,--allow-multiple-definition");
}
