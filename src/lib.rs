pub fn _placeholder() {}
pub mod lab;
