//! Console device: register `REG_CONSOLE` (write) with value `addr | len << 48` prints
//! `len` (<= 256) bytes of guest memory at `addr` as one line. Output only; it is not a
//! non-deterministic input and is not logged.
use crate::error::Result;
use crate::vstate::memory::GuestRam;

#[derive(Debug, Default)]
pub struct Console {
    pub lines: Vec<String>,
    pub echo: bool,
}

impl Console {
    pub fn write(&mut self, ram: &GuestRam, value: u64) -> Result<()> {
        let addr = value & 0xffff_ffff_ffff;
        let len = ((value >> 48) as usize).min(256);
        let bytes = ram.slice(addr, len)?;
        let line = String::from_utf8_lossy(bytes).into_owned();
        if self.echo {
            eprintln!("[guest] {line}");
        }
        if self.lines.len() < 1000 {
            self.lines.push(line);
        }
        Ok(())
    }
}
