//! The tests' `#[sqlx::test(migrations = "./migrations")]` embed the migrations when they
//! compile: rebuild when one is added or changed.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
