pub fn _placeholder() {}
pub mod agent;
pub mod testkit;
