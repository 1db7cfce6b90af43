//! `sqlx::migrate!` embeds the migrations when the crate compiles: rebuild when one is added or
//! changed, or the embedded set would lag behind the files.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
