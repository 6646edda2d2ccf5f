//! Malformed images, guest exceptions, triple faults and bad device accesses end the run
//! with a clear error (never a hang).
mod common;

use common::*;
use ft_vmm::{Control, Error, Mode, Vmm};
use std::time::Duration;

fn run_image(elf: Vec<u8>) -> Result<ft_vmm::RunReport, Error> {
    with_timeout(Duration::from_secs(20), move || {
        let mut vmm = Vmm::new(cfg(Mode::Free), &elf, Control::new())?;
        vmm.run()
    })
}

#[test]
fn malformed_images_are_rejected() {
    let good = ft_vmm::GUEST_ELF.to_vec();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        (
            "not elf",
            b"MZ this is not an ELF image at all, sorry................................".to_vec(),
        ),
        ("truncated", good[..good.len() / 3].to_vec()),
    ];
    let mut wrong_machine = good.clone();
    wrong_machine[18] = 183; // aarch64
    cases.push(("wrong machine", wrong_machine));
    let mut bad_magic = good.clone();
    let at = bad_magic
        .windows(8)
        .position(|w| w == b"FTGUEST1")
        .expect("header in image");
    bad_magic[at] = b'X';
    cases.push(("bad header magic", bad_magic));
    let mut bad_entry = build_elf(&[0x0F, 0x0B]);
    bad_entry[24..32].copy_from_slice(&0x4000_0000u64.to_le_bytes());
    cases.push(("entry outside image", bad_entry));
    let mut too_big = build_elf(&[0x0F, 0x0B]);
    let ph = 64;
    too_big[ph + 40..ph + 48].copy_from_slice(&(64u64 << 20).to_le_bytes()); // memsz 64 MiB
    cases.push(("image too large", too_big));
    for (name, img) in cases {
        match run_image(img) {
            Err(e @ Error::Image(_)) => {
                let msg = e.to_string();
                eprintln!("{name}: {msg}");
                assert!(msg.contains("invalid guest image"), "{name}: {msg}");
            }
            other => panic!(
                "{name}: expected an image error, got {:?}",
                other.map(|r| r.outcome)
            ),
        }
    }
}

#[test]
fn guest_exception_is_reported() {
    // ud2 at the entry point.
    match run_image(build_elf(&[0x0F, 0x0B])) {
        Err(Error::GuestFault { vector: 6, rip, .. }) => {
            assert_eq!(rip, ft_vmm::abi::IMAGE_BASE + 0x40 + 32 * 16 + 16)
        }
        other => panic!("expected #UD, got {:?}", other.map(|r| r.outcome)),
    }
    // Port I/O from ring 3 (IOPL 0) is a #GP.
    match run_image(build_elf(&[0xE6, 0x80])) {
        Err(Error::GuestFault { vector: 13, .. }) => {}
        other => panic!("expected #GP, got {:?}", other.map(|r| r.outcome)),
    }
    // A page fault: read above the 1 GiB identity map.
    match run_image(build_elf(&[0x48, 0x8B, 0x04, 0x25, 0x00, 0x00, 0x00, 0x80])) {
        Err(e @ Error::GuestFault { vector: 14, .. }) => eprintln!("{e}"),
        other => panic!("expected #PF, got {:?}", other.map(|r| r.outcome)),
    }
}

#[test]
fn triple_fault_is_reported() {
    // The guest wipes IDT gates 6 (#UD), 8 (#DF) and 13 (#GP), then executes ud2:
    // #UD -> not-present gate -> #GP -> not present -> #DF -> not present -> shutdown.
    let mut code = vec![0x31, 0xC0]; // xor eax, eax
    for off in [0x60u32, 0x68, 0x80, 0x88, 0xD0, 0xD8] {
        code.extend_from_slice(&[0x48, 0x89, 0x04, 0x25]); // mov [disp32], rax
        code.extend_from_slice(&(ft_vmm::abi::IDT_ADDR as u32 + off).to_le_bytes());
    }
    code.extend_from_slice(&[0x0F, 0x0B]);
    match run_image(build_elf(&code)) {
        Err(e @ Error::TripleFault { .. }) => eprintln!("{e}"),
        other => panic!(
            "expected a triple fault, got {:?}",
            other.map(|r| r.outcome)
        ),
    }
}

#[test]
fn bad_device_accesses_are_reported() {
    use ft_vmm::abi::*;
    let mut unknown = Vec::new();
    load_rax(&mut unknown, MMIO_BASE + 0x800);
    // movabs eax, [clock] (a 4-byte access)
    let mut narrow = vec![0xA1];
    narrow.extend_from_slice(&(MMIO_BASE + REG_CLOCK_NS).to_le_bytes());
    let mut write_clock = Vec::new();
    store_rax(&mut write_clock, MMIO_BASE + REG_CLOCK_NS);
    let mut write_idle = Vec::new();
    store_rax(&mut write_idle, MMIO_BASE + REG_IDLE);
    let mut read_doorbell = Vec::new();
    load_rax(&mut read_doorbell, MMIO_BASE + REG_NIC_DOORBELL);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown register", unknown),
        ("narrow access", narrow),
        ("write to clock", write_clock),
        (
            "write to the idle register (read-only since ABI 2)",
            write_idle,
        ),
        ("read of the doorbell", read_doorbell),
    ];
    for (name, mut code) in cases {
        code.extend_from_slice(&[0xEB, 0xFE]);
        match run_image(build_elf(&code)) {
            Err(e @ Error::BadDeviceAccess { .. }) => eprintln!("{name}: {e}"),
            other => panic!(
                "{name}: expected BadDeviceAccess, got {:?}",
                other.map(|r| r.outcome)
            ),
        }
    }
}

#[test]
fn spinning_guest_can_be_stopped() {
    // jmp $ in ring 3: no exits at all; stop must still end the run (signal kick).
    let control = Control::new();
    let c = control.clone();
    let t = std::thread::spawn(move || {
        let mut vmm = Vmm::new(cfg(Mode::Free), &build_elf(&[0xEB, 0xFE]), c)?;
        vmm.run()
    });
    std::thread::sleep(Duration::from_millis(500));
    let t0 = std::time::Instant::now();
    control.request_stop();
    let r = with_timeout(Duration::from_secs(10), move || t.join().unwrap()).expect("run");
    assert_eq!(r.outcome, ft_vmm::RunOutcome::Stopped);
    assert_eq!(r.exits, 0);
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[test]
fn images_that_read_the_host_directly_are_refused() {
    // The built-in guest has none (vmm/build.rs also refuses to build one that has).
    assert_eq!(
        ft_vmm::scan::forbidden_instructions(ft_vmm::GUEST_ELF),
        vec![],
        "built-in guest"
    );
    let cases: [(&str, &[u8]); 5] = [
        ("RDTSC", &[0x0F, 0x31]),
        ("RDTSCP", &[0x0F, 0x01, 0xF9]),
        ("RDRAND", &[0x48, 0x0F, 0xC7, 0xF0]),
        ("RDSEED", &[0x48, 0x0F, 0xC7, 0xF8]),
        ("CPUID", &[0x0F, 0xA2]),
    ];
    for (name, ins) in cases {
        // Preceded by a harmless instruction, so the finding is not at the entry point.
        let mut code = vec![0x90];
        code.extend_from_slice(ins);
        code.extend_from_slice(&[0xEB, 0xFE]);
        let elf = build_elf(&code);
        let found = ft_vmm::scan::forbidden_instructions(&elf);
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        assert_eq!(found[0].mnemonic, name);
        match Vmm::new(cfg(Mode::Free), &elf, Control::new()) {
            Err(e @ Error::Image(_)) => {
                assert!(e.to_string().contains(name), "{e}");
                eprintln!("{name}: {e}");
            }
            Err(e) => panic!("{name}: expected an image error, got {e}"),
            Ok(_) => panic!("{name}: image accepted"),
        }
    }
    // The same bytes as data inside an instruction are not an instruction: the check
    // decodes the code, it does not grep for byte patterns.
    let code = [0xB8, 0x0F, 0x31, 0x0F, 0xA2, 0xEB, 0xFE]; // mov eax, 0xA20F310F; jmp $
    assert_eq!(
        ft_vmm::scan::forbidden_instructions(&build_elf(&code)),
        vec![]
    );
}
