// hyzo from C++17 through hyzo.hpp: ZO-AdamW on a quadratic, save/restore, and errors as
// exceptions. Built with CMake against an installed hyzo (find_package(hyzo)).
#include <cmath>
#include <cstdio>
#include <vector>

#include "hyzo.hpp"

// Low-rank directions (spec §7): the weight matrix W (rows x cols) is never written during a
// step; the forward adds c (x B) A^T / sqrt(r) for the step's direction instead.
static int lowrank_example() {
    const std::size_t rows = 4, cols = 8, rank = 2;
    std::vector<float> w(rows * cols, 0.0f), target(rows * cols);
    for (std::size_t i = 0; i < target.size(); i++) target[i] = std::cos(0.7f * static_cast<float>(i));

    hyzo_config cfg = hyzo::default_config();
    cfg.direction = HYZO_DIRECTION_LOWRANK;
    cfg.rank = rank;
    cfg.lr = 0.05f;
    cfg.eps = 1e-2f;
    cfg.num_directions = 2;
    cfg.seed = 7;
    hyzo::Optimizer opt = hyzo::Optimizer::cpu(cfg, 1);
    opt.add_tensor(w.data(), w.size(), 0);
    opt.set_shape(0, rows, cols);
    std::vector<float> factors(opt.lowrank_factors_len());
    const float scale = 1.0f / std::sqrt(static_cast<float>(rank));
    int written = 0;

    // ||(W + c Z) x - T x||^2 over the unit vectors x = e_k: the forward of a linear layer.
    auto loss = [&] {
        auto [d, c] = opt.forward_perturbation();
        if (c != 0.0f) opt.lowrank_factors(d, factors.data(), factors.size());
        const float *a = factors.data(), *b = factors.data() + rows * rank;
        float s = 0.0f;
        for (std::size_t i = 0; i < rows; i++)
            for (std::size_t k = 0; k < cols; k++) {
                float z = 0.0f;
                for (std::size_t p = 0; p < rank; p++) z += a[i * rank + p] * b[k * rank + p];
                const float e = w[i * cols + k] + (c != 0.0f ? c * z * scale : 0.0f) - target[i * cols + k];
                s += e * e;
            }
        return s / static_cast<float>(rows * cols);
    };
    auto plain = [&] {
        float s = 0.0f;
        for (std::size_t i = 0; i < w.size(); i++) s += (w[i] - target[i]) * (w[i] - target[i]);
        return s / static_cast<float>(w.size());
    };
    const float first = plain();
    for (int step = 0; step < 400; step++) {
        const auto before = w;
        opt.begin();
        while (true) {
            if (w != before) written++;
            if (!opt.feed(loss())) break;
        }
    }
    const float last = plain();
    std::printf("low-rank (r = %zu): loss %.5f -> %.5f; W written during a forward: %d times\n",
                rank, first, last, written);
    return (last < 0.5f * first && written == 0) ? 0 : 1;
}

// A tensor registered through std::shared_ptr lives as long as the optimizer: the caller
// may drop its own reference (valgrind, in scripts/test-ffi, would report a write to freed
// memory otherwise).
static int owned_tensor_example() {
    const std::size_t n = 256;
    hyzo_config cfg = hyzo::default_config();
    cfg.rule = HYZO_RULE_ADAMW;
    cfg.lr = 0.01f;
    cfg.seed = 3;
    hyzo::Optimizer opt(cfg);
    std::shared_ptr<float[]> w(new float[n]);
    for (std::size_t i = 0; i < n; i++) w[i] = 1.0f;
    std::weak_ptr<float[]> watch = w;
    float *raw = w.get();
    opt.add_tensor(std::move(w), n, 0);
    hyzo::Optimizer moved = std::move(opt); // ownership moves with the handle
    auto loss = [&] {
        float s = 0.0f;
        for (std::size_t i = 0; i < n; i++) s += raw[i] * raw[i];
        return s / static_cast<float>(n);
    };
    const float first = loss();
    for (int i = 0; i < 20; i++) moved.zo_step(loss);
    const bool alive = !watch.expired();
    const float last = loss();
    std::printf("owned tensor: alive while registered %d, loss %.3f -> %.3f\n", alive, first,
                last);
    return (alive && last < first) ? 0 : 1;
}

int main() {
    const std::size_t n = 64;
    std::vector<float> w(n, 0.0f), target(n);
    for (std::size_t i = 0; i < n; i++) target[i] = std::sin(0.3f * static_cast<float>(i));
    auto loss = [&] {
        float s = 0.0f;
        for (std::size_t i = 0; i < n; i++) s += (w[i] - target[i]) * (w[i] - target[i]);
        return s / static_cast<float>(n);
    };

    hyzo_config cfg = hyzo::default_config();
    cfg.rule = HYZO_RULE_ADAMW;
    cfg.lr = 0.02f;
    cfg.eps = 1e-2f;
    cfg.num_directions = 4;
    cfg.seed = 99;

    int failures = 0;
    try {
        hyzo::Optimizer opt = hyzo::Optimizer::cpu(cfg, 2);
        opt.add_tensor(w.data(), n, 0);
        const float first = loss();
        for (int step = 0; step < 300; step++) {
            const float l = opt.zo_step(loss);
            if (step % 100 == 0) std::printf("  step %3d  loss %.5f\n", step, l);
        }
        const float last = loss();
        std::printf("zo-adamw: loss %.5f -> %.5f in %llu steps\n", first, last,
                    static_cast<unsigned long long>(opt.steps()));
        if (!(last < 0.5f * first)) {
            std::fprintf(stderr, "FAIL: the loss did not halve\n");
            failures++;
        }

        // Save, run, restore, run again: the same bits.
        auto state = opt.save_state();
        auto saved = w;
        for (int i = 0; i < 20; i++) opt.zo_step(loss);
        auto after = w;
        opt.load_state(state);
        w = saved;
        for (int i = 0; i < 20; i++) opt.zo_step(loss);
        if (w != after) {
            std::fprintf(stderr, "FAIL: the resumed run differs\n");
            failures++;
        }

        // A failing call throws hyzo::Error with the status and the message.
        try {
            opt.set_lr(-1.0f);
            std::fprintf(stderr, "FAIL: a negative lr was accepted\n");
            failures++;
        } catch (const hyzo::Error &e) {
            std::printf("caught: status %d, %s\n", static_cast<int>(e.status()), e.what());
            if (e.status() != HYZO_ERR_INVALID_ARGUMENT) failures++;
        }

        // An exception in the forward pass aborts the step: parameters restored.
        auto before = w;
        try {
            opt.zo_step([]() -> float { throw std::runtime_error("forward failed"); });
        } catch (const std::runtime_error &e) {
            // Restored up to f32 rounding of perturb + restore (exact with the compensated
            // precision for f16/bf16).
            float worst = 0.0f;
            for (std::size_t i = 0; i < n; i++) worst = std::fmax(worst, std::fabs(w[i] - before[i]));
            std::printf("caught: %s; parameters restored (max change %g)\n", e.what(), worst);
            if (!(worst < 1e-5f)) failures++;
        }
        // Only a pass that fails (a device error) poisons an optimizer; an aborted step does not.
        if (opt.poisoned()) failures++;

        failures += lowrank_example();
        failures += owned_tensor_example();
    } catch (const hyzo::Error &e) {
        std::fprintf(stderr, "unexpected hyzo error: %s\n", e.what());
        return 1;
    }
    std::puts(failures == 0 ? "cpp example: OK" : "cpp example: FAILED");
    return failures == 0 ? 0 : 1;
}
