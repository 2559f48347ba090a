//! The proof run: provision, build, pack, boot, check; repeated `--runs` times.

mod guest_build;
mod provision;
mod vm;

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use qemu_harness::ladder::Step;
use qemu_harness::manifest::Manifest;
use qemu_harness::plan::Plan;
use qemu_harness::{initramfs, plan};

/// What the command line asked for.
#[derive(Debug)]
pub struct Options {
    /// The plan (ladder) to run.
    pub plan: &'static Plan,
    /// How many boots.
    pub runs: u32,
    /// Keep the work dir.
    pub keep: bool,
    /// Echo every console line.
    pub echo_console: bool,
    /// A kernel to boot instead of the cached one.
    pub kernel: Option<PathBuf>,
    /// Use the QEMU unpacked in the cache even when one is on `PATH`.
    pub unpacked_qemu: bool,
    /// Extra kernel command-line arguments.
    pub kernel_args: Vec<String>,
    /// Multiplies every timeout.
    pub timeout_factor: f64,
    /// vCPUs.
    pub smp: u32,
    /// Guest memory.
    pub memory: String,
}

fn scaled_ladder(plan: &Plan, factor: f64) -> Vec<Step> {
    plan.ladder
        .iter()
        .map(|step| Step {
            timeout: step.timeout.mul_f64(factor),
            ..*step
        })
        .collect()
}

/// Prints the plan and the manifest the guest would get.
pub fn show_plan(options: &Options) -> Result<()> {
    let plan = options.plan;
    println!("ladder `{}`:", plan.name);
    for (i, step) in scaled_ladder(plan, options.timeout_factor)
        .iter()
        .enumerate()
    {
        println!(
            "  {:>2}. {:<52} fail: {:<52} timeout {:.0} s",
            i + 1,
            step.ok,
            step.fail,
            step.timeout.as_secs_f64()
        );
    }
    println!("guest binaries (built static, packed as /bin/<bin>, the first as /init):");
    for binary in plan.binaries {
        println!("  {} (package {})", binary.bin, binary.package);
    }
    for file in plan.files {
        println!("guest file {}:", file.path);
        for line in file.contents.lines() {
            println!("  {line}");
        }
    }
    println!("guest manifest ({}):", qemu_harness::manifest::GUEST_PATH);
    let manifest = Manifest::from_plan(plan, options.timeout_factor).to_toml()?;
    for line in manifest.lines() {
        println!("  {line}");
    }
    println!(
        "cache: {}\nguest target dir: {}",
        provision::cache_dir()?.display(),
        guest_build::target_dir().display()
    );
    Ok(())
}

/// Runs the proof run; `Ok(true)` when every boot climbed the ladder and powered off.
pub fn run(options: &Options) -> Result<bool> {
    let plan = options.plan;
    let started = Instant::now();
    println!(
        "== qemu-harness: ladder `{}` ({} steps), {} run(s)",
        plan.name,
        plan.ladder.len(),
        options.runs
    );

    let tools = provision::provision(options.kernel.as_deref(), options.unpacked_qemu)?;
    let built = guest_build::build(plan.binaries)?;

    let work = tempfile::Builder::new()
        .prefix("qemu-harness-")
        .tempdir()
        .context("creating the work dir")?;
    let manifest = Manifest::from_plan(plan, options.timeout_factor).to_toml()?;
    fs::write(work.path().join("manifest.toml"), &manifest)?;
    let (init, rest) = built
        .split_first()
        .context("the plan has no guest binaries")?;
    let rest: Vec<(&str, &[u8])> = rest
        .iter()
        .map(|b| (b.binary.bin, b.bytes.as_slice()))
        .collect();
    let image = initramfs::pack(&init.bytes, &rest, &manifest, plan.files)?;
    let initrd = work.path().join("initramfs.cpio");
    fs::write(&initrd, &image)?;
    println!(
        "[pack] {} ({:.1} MiB: /init = {}, /bin: {})",
        initrd.display(),
        image.len() as f64 / (1024.0 * 1024.0),
        init.binary.bin,
        rest.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    );

    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let tsc_khz = vm::tsc_khz_from_cpuinfo(&cpuinfo);
    if tsc_khz.is_none() {
        println!("[boot] warning: no `cpu MHz` in /proc/cpuinfo; booting without tsc_early_khz");
    }
    let vm = vm::Vm {
        qemu: tools.qemu,
        kernel: tools.kernel,
        initrd,
        smp: options.smp,
        memory: options.memory.clone(),
        append: vm::kernel_cmdline(tsc_khz, &options.kernel_args),
    };
    println!("[boot] {:?}", vm.command());
    println!(
        "[boot] kernel {}; prepared in {:.1} s",
        tools.kernel_origin,
        started.elapsed().as_secs_f64()
    );

    let ladder = scaled_ladder(plan, options.timeout_factor);
    let mut done_times = Vec::new();
    let mut failures = 0u32;
    for run in 1..=options.runs {
        println!("[run {run}/{}] booting", options.runs);
        let boot = vm::boot(&vm, &ladder, work.path(), run, options.echo_console)?;
        match (boot.verdict(), &boot.ladder) {
            (vm::Verdict::Pass { done, off }, _) => {
                println!(
                    "[run {run}/{}] PASS: boot-to-done {:.2} s, powered off at {:.2} s, \
                     qemu exit status 0",
                    options.runs,
                    done.as_secs_f64(),
                    off.as_secs_f64()
                );
                done_times.push(done);
            }
            (vm::Verdict::NoPowerOff, _) => {
                failures += 1;
                println!(
                    "[run {run}/{}] FAILED: the ladder was climbed but the VM did not power \
                     off within {} s (console: {})",
                    options.runs,
                    vm::POWEROFF_GRACE.as_secs(),
                    boot.console_log.display()
                );
            }
            (vm::Verdict::QemuStatus(status), _) => {
                failures += 1;
                println!(
                    "[run {run}/{}] FAILED: the ladder was climbed but QEMU exited with {status} \
                     (console: {})",
                    options.runs,
                    boot.console_log.display()
                );
            }
            (vm::Verdict::Ladder, ladder) => {
                failures += 1;
                if let Err(failure) = ladder {
                    println!("[run {run}/{}] {failure}", options.runs);
                }
                if !boot.after_failure.is_empty() {
                    println!("console lines after the failure:");
                    for line in &boot.after_failure {
                        println!("  | {line}");
                    }
                }
                println!("  full console: {}", boot.console_log.display());
            }
        }
        if let Some(status) = boot.status.filter(|s| !s.success()) {
            println!("  qemu exited with {status}");
        }
        if boot.ladder.is_err() && !boot.qemu_stderr.trim().is_empty() {
            println!("  qemu stderr:\n{}", boot.qemu_stderr.trim_end());
        }
    }

    println!("== summary: ladder `{}`", plan.name);
    println!(
        "   {} of {} run(s) passed; total wall time {:.1} s",
        done_times.len(),
        options.runs,
        started.elapsed().as_secs_f64()
    );
    if !done_times.is_empty() {
        println!("   boot-to-done: {}", stats(&mut done_times));
    }
    if options.keep || failures > 0 {
        let kept = work.keep();
        println!("   work dir kept: {}", kept.display());
    }
    if plan.name != plan::FULL.name {
        println!(
            "   note: `{}` is a developer ladder; the full proof ladder is `--ladder full`",
            plan.name
        );
    }
    Ok(failures == 0)
}

/// `min / median / max` and each time.
fn stats(times: &mut [Duration]) -> String {
    let each: Vec<_> = times
        .iter()
        .map(|t| format!("{:.2}", t.as_secs_f64()))
        .collect();
    times.sort();
    let min = times.first().copied().unwrap_or_default();
    let max = times.last().copied().unwrap_or_default();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    format!(
        "min {:.2} s, median {:.2} s, max {:.2} s (each: {})",
        min.as_secs_f64(),
        median.as_secs_f64(),
        max.as_secs_f64(),
        each.join(" ")
    )
}
