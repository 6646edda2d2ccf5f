fn main() {
    let mut e = aya::Ebpf::load(ftd::dataplane::EBPF_OBJECT).unwrap();
    for (name, p) in e.programs_mut() {
        let r = match p {
            aya::programs::Program::Xdp(x) => x.load(),
            aya::programs::Program::SchedClassifier(x) => x.load(),
            _ => Ok(()),
        };
        match r {
            Ok(()) => println!("{name}: OK"),
            Err(aya::programs::ProgramError::LoadError {
                io_error,
                verifier_log,
            }) => {
                let s = verifier_log.to_string();
                let lines: Vec<&str> = s.lines().collect();
                println!(
                    "{name}: {io_error}\n{}",
                    lines[lines.len().saturating_sub(25)..].join("\n")
                );
            }
            Err(e) => println!("{name}: {e}"),
        }
    }
}
