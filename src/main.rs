fn main() {
    println!("streamboot");
}
