// The C++ wrapper (hyzo.hpp) driving a CUDA optimizer on the emulated device (the host build
// of the same kernels; HYZO_CUDA_EMULATOR=1, HYZO_CUDA_EXACT=1, set by scripts/test-ffi)
// beside a CPU optimizer: the same hybrid schedule through the wrapper's calls (streams,
// first-order steps, host and device losses, a skipped step, save and load) leaves both
// with the same parameters and the same state, bit for bit.
//
// The emulated device's addresses are host addresses (src/backend/cuda/emulator.rs), so
// host vectors stand in for device memory here; on a GPU, tests/ffi_cuda.rs covers the ABI.
#include "hyzo.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr std::size_t N0 = 1031; // f32
constexpr std::size_t N1 = 517;  // bf16, after an odd-sized tensor

int failures = 0;

void expect(bool ok, const char *what, int step) {
    if (!ok) {
        std::fprintf(stderr, "FAIL at step %d: %s\n", step, what);
        ++failures;
    }
}

float bf16_to_f32(std::uint16_t h) {
    std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

std::uint16_t f32_to_bf16(float f) {
    std::uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFF + ((bits >> 16) & 1); // round to nearest even (finite inputs)
    return static_cast<std::uint16_t>(bits >> 16);
}

struct Tensors {
    std::vector<float> a, ga;
    std::vector<std::uint16_t> b;
    std::vector<float> gb;

    Tensors() : a(N0), ga(N0), b(N1), gb(N1) {
        for (std::size_t i = 0; i < N0; ++i) {
            a[i] = std::cos(static_cast<float>(i) * 0.37f) * 0.5f;
            ga[i] = std::sin(static_cast<float>(i) * 0.05f) * 0.1f;
        }
        for (std::size_t i = 0; i < N1; ++i) {
            b[i] = f32_to_bf16(std::sin(static_cast<float>(i) * 0.11f));
            gb[i] = std::cos(static_cast<float>(i) * 0.07f) * 0.1f;
        }
    }

    void add_to(hyzo::Optimizer &opt) {
        opt.add_tensor(a.data(), N0, 0, ga.data());
        opt.add_tensor_raw(b.data(), HYZO_BF16, N1, N0, gb.data(), HYZO_F32);
    }

    // A loss with a minimum away from the start (the two passes' losses differ).
    float loss() const {
        double s = 0;
        for (std::size_t i = 0; i < N0; ++i) s += (a[i] - 0.25) * (a[i] - 0.25);
        for (std::size_t i = 0; i < N1; ++i) s += 0.5 * bf16_to_f32(b[i]) * bf16_to_f32(b[i]);
        return static_cast<float>(s / (N0 + N1));
    }

    // The loss's gradient at the current values, as a backward pass would write it.
    void backward() {
        const float n = static_cast<float>(N0 + N1);
        for (std::size_t i = 0; i < N0; ++i) ga[i] = 2.0f * (a[i] - 0.25f) / n;
        for (std::size_t i = 0; i < N1; ++i) gb[i] = bf16_to_f32(b[i]) / n;
    }

    // Writes `o`'s values in place: the registered addresses stay.
    void assign_values(const Tensors &o) {
        std::memcpy(a.data(), o.a.data(), N0 * sizeof(float));
        std::memcpy(b.data(), o.b.data(), N1 * sizeof(std::uint16_t));
    }

    bool same_as(const Tensors &o) const {
        return std::memcmp(a.data(), o.a.data(), N0 * sizeof(float)) == 0 &&
               std::memcmp(b.data(), o.b.data(), N1 * sizeof(std::uint16_t)) == 0;
    }
};

} // namespace

int main() {
    if (!hyzo::cuda_available()) {
        std::fprintf(stderr, "no CUDA device (run with HYZO_CUDA_EMULATOR=1)\n");
        return 1;
    }
    hyzo_config cfg = hyzo::default_config();
    cfg.seed = 31;
    cfg.rule = HYZO_RULE_ADAMW;
    cfg.lr = 0.01f;
    cfg.eps = 1e-2f;
    cfg.num_directions = 2;
    cfg.precision = HYZO_PRECISION_STOCHASTIC;
    cfg.fo_steps = 1;
    cfg.zo_steps = 2;

    Tensors host, dev;
    hyzo::Optimizer cpu(cfg);
    hyzo::Optimizer gpu(cfg, HYZO_DEVICE_CUDA, 0);
    gpu.set_stream(nullptr);
    host.add_to(cpu);
    dev.add_to(gpu);

    const int steps = 10;
    const int nan_step = 4;    // a NaN loss: both skip
    const int device_from = 6; // the CUDA optimizer's losses from device memory from here on
    std::vector<unsigned char> saved;
    Tensors at_save;
    float first = host.loss();
    for (int step = 0; step < steps; ++step) {
        expect(cpu.next_phase() == gpu.next_phase(), "next_phase", step);
        if (cpu.next_phase() == HYZO_PHASE_FO) {
            host.backward();
            dev.backward();
            cpu.fo_step();
            gpu.fo_step();
        } else if (step < device_from) {
            int pass = 0;
            auto poisoned = [&](const Tensors &t) {
                return step == nan_step && pass++ == 1 ? NAN : t.loss();
            };
            cpu.zo_step([&] { return poisoned(host); });
            pass = 0;
            gpu.zo_step([&] { return poisoned(dev); });
            expect(cpu.last_step_skipped() == (step == nan_step), "cpu skip", step);
            expect(gpu.last_step_skipped() == (step == nan_step), "cuda skip", step);
        } else {
            // One slot per pass in "device" memory, alive until the step's last pass ran.
            std::vector<float> slots(2 * cfg.num_directions);
            cpu.begin();
            gpu.begin();
            bool more = true;
            for (std::size_t k = 0; more; ++k) {
                gpu.synchronize();
                slots.at(k) = dev.loss();
                bool cpu_more = cpu.feed(host.loss());
                more = gpu.feed_device(&slots[k]);
                expect(cpu_more == more, "passes per step", step);
            }
            gpu.synchronize();
        }
        expect(host.same_as(dev), "parameters", step);
        expect(cpu.steps() == gpu.steps(), "steps", step);
        expect(cpu.skipped() == gpu.skipped(), "skipped", step);
        expect(cpu.updates() == gpu.updates() && cpu.fo_updates() == gpu.fo_updates(),
               "updates", step);
        if (step == 7) {
            saved = gpu.save_state();
            at_save = dev;
        }
    }
    expect(cpu.save_state() == gpu.save_state(), "saved states", steps);
    expect(cpu.skipped() == 1, "one skipped step", steps);
    expect(host.loss() < first, "the loss went down", steps);

    // A checkpoint of step 8, loaded into the CUDA optimizer with its parameters, replays
    // the last two steps exactly as the CPU optimizer took them.
    dev.assign_values(at_save);
    gpu.load_state(saved);
    expect(gpu.steps() == 8, "steps after the load", steps);
    for (int step = 8; step < steps; ++step) {
        if (gpu.next_phase() == HYZO_PHASE_FO) {
            dev.backward();
            gpu.fo_step();
        } else {
            gpu.zo_step([&] { return dev.loss(); });
        }
    }
    gpu.synchronize();
    expect(host.same_as(dev), "parameters after the load and two steps", steps);
    expect(cpu.save_state() == gpu.save_state(), "states after the load", steps);

    if (failures != 0) return 1;
    std::printf("C++ wrapper on the emulated device: %d steps equal the CPU's bit for bit "
                "(loss %.6f -> %.6f)\n",
                steps, first, host.loss());
    return 0;
}
