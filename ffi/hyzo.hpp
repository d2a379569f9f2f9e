// hyzo.hpp: a small C++17 RAII wrapper over the C API of hyzo.h.
//
// - hyzo::Optimizer owns a hyzo_optimizer (move-only; destroyed in the destructor);
// - tensors registered through std::shared_ptr are owned with it: their memory is released
//   only after the C optimizer is destroyed (raw pointers stay the caller's to keep alive);
// - every failing call throws hyzo::Error, carrying the status and the library's message;
// - zo_step(loss_fn) runs a whole zeroth-order step, aborting it (restoring the parameters)
//   if loss_fn throws.
// Threads: as the C API (one optimizer used by one thread at a time).
#ifndef HYZO_HPP
#define HYZO_HPP

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "hyzo.h"

namespace hyzo {

/// A failed hyzo call: status() is the C status, what() the library's message.
class Error : public std::runtime_error {
public:
    Error(hyzo_status status, const std::string &message)
        : std::runtime_error(message), status_(status) {}
    hyzo_status status() const noexcept { return status_; }

private:
    hyzo_status status_;
};

/// Throws hyzo::Error unless status is HYZO_OK.
inline void check(hyzo_status status) {
    if (status != HYZO_OK) {
        throw Error(status, std::string(hyzo_status_string(status)) + ": " + hyzo_last_error());
    }
}

/// The library version.
inline std::string version() { return hyzo_version(); }

/// Whether CUDA optimizers can be created.
inline bool cuda_available() { return hyzo_cuda_available() != 0; }

/// The defaults of hyzo_config_default(), to adjust field by field.
inline hyzo_config default_config() { return hyzo_config_default(); }

/// The hyzo_dtype of a C++ element type (f16/bf16 have no standard C++17 type: pass the
/// dtype explicitly with add_tensor_raw).
template <class T> struct dtype_of;
template <> struct dtype_of<float> {
    static constexpr hyzo_dtype value = HYZO_F32;
};

class Optimizer {
public:
    /// An optimizer on `device` (`ordinal` names the CUDA device).
    explicit Optimizer(const hyzo_config &cfg, hyzo_device device = HYZO_DEVICE_CPU,
                       int ordinal = 0) {
        check(hyzo_optimizer_create(&cfg, device, ordinal, &opt_));
    }

    /// A CPU optimizer with `threads` threads of its own (0: the process-wide pool).
    static Optimizer cpu(const hyzo_config &cfg, std::uint32_t threads) {
        hyzo_optimizer *o = nullptr;
        check(hyzo_optimizer_create_cpu(&cfg, threads, &o));
        return Optimizer(o);
    }

    ~Optimizer() { hyzo_optimizer_destroy(opt_); }
    Optimizer(const Optimizer &) = delete;
    Optimizer &operator=(const Optimizer &) = delete;
    Optimizer(Optimizer &&other) noexcept
        : opt_(std::exchange(other.opt_, nullptr)), owners_(std::move(other.owners_)) {}
    Optimizer &operator=(Optimizer &&other) noexcept {
        if (this != &other) {
            // The old optimizer goes before the memory it may write.
            hyzo_optimizer_destroy(opt_);
            opt_ = std::exchange(other.opt_, nullptr);
            owners_ = std::move(other.owners_);
        }
        return *this;
    }

    /// The C handle, for calls this wrapper does not cover.
    hyzo_optimizer *get() const noexcept { return opt_; }

    /// Registers `numel` elements at `data` (any dtype), with an optional gradient.
    void add_tensor_raw(void *data, hyzo_dtype dtype, std::uint64_t numel,
                        std::uint64_t global_offset, void *grad = nullptr,
                        hyzo_dtype grad_dtype = HYZO_F32) {
        check(hyzo_optimizer_add_tensor(opt_, data, dtype, numel, global_offset, grad,
                                        grad_dtype));
    }

    /// Registers a float tensor (and its float gradient, if given). The memory must outlive
    /// the optimizer.
    void add_tensor(float *data, std::size_t numel, std::uint64_t global_offset,
                    float *grad = nullptr) {
        add_tensor_raw(data, HYZO_F32, numel, global_offset, grad, HYZO_F32);
    }

    /// Registers a float tensor owned with the optimizer: `data` (and `grad`) stay alive as
    /// long as the C optimizer, whatever the caller does with its own references.
    void add_tensor(std::shared_ptr<float[]> data, std::size_t numel,
                    std::uint64_t global_offset, std::shared_ptr<float[]> grad = nullptr) {
        add_tensor(data.get(), numel, global_offset, grad.get());
        owners_.push_back(std::move(data));
        if (grad) {
            owners_.push_back(std::move(grad));
        }
    }

    /// Gives tensor `index` a row-major rows x cols shape: under HYZO_DIRECTION_LOWRANK it
    /// takes a low-rank direction that the forward applies (spec §7). Before the first step.
    void set_shape(std::size_t index, std::uint64_t rows, std::uint64_t cols) {
        check(hyzo_optimizer_set_shape(opt_, static_cast<std::uint64_t>(index), rows, cols));
    }

    /// Floats of one direction's low-rank factors (A then B of each shaped tensor).
    std::uint64_t lowrank_factors_len() const {
        std::uint64_t len = 0;
        check(hyzo_optimizer_lowrank_factors_len(opt_, &len));
        return len;
    }

    /// Writes the factors of `direction` of the current step to `out` (lowrank_factors_len()
    /// floats, in the optimizer's memory).
    void lowrank_factors(std::uint32_t direction, float *out, std::uint64_t len) {
        check(hyzo_optimizer_lowrank_factors(opt_, direction, out, len));
    }

    /// The term c Z_d the next forward adds to low-rank tensors, as {d, c} (c = 0: none).
    std::pair<std::uint32_t, float> forward_perturbation() const {
        std::uint32_t direction = 0;
        float coeff = 0.0f;
        check(hyzo_zo_forward_perturbation(opt_, &direction, &coeff));
        return {direction, coeff};
    }

    void set_lr(float lr) { check(hyzo_optimizer_set_lr(opt_, lr)); }
    void set_weight_decay(float wd) { check(hyzo_optimizer_set_weight_decay(opt_, wd)); }
    /// Learning rate / weight decay of first-order steps; NaN: follow set_lr / set_weight_decay.
    void set_fo_lr(float lr) { check(hyzo_optimizer_set_fo_lr(opt_, lr)); }
    void set_fo_weight_decay(float wd) { check(hyzo_optimizer_set_fo_weight_decay(opt_, wd)); }
    void set_stream(void *stream) { check(hyzo_optimizer_set_stream(opt_, stream)); }

    hyzo_config config() const {
        hyzo_config c;
        check(hyzo_optimizer_get_config(opt_, &c));
        return c;
    }

    /// Starts a zeroth-order step; then feed() losses while it returns true.
    void begin() { check(hyzo_zo_begin(opt_)); }
    /// Feeds a loss; true when another forward pass is needed.
    bool feed(float loss) {
        int more = 0;
        check(hyzo_zo_feed(opt_, loss, &more));
        return more != 0;
    }
    /// Feeds a loss the forward pass left in device memory (one float on the optimizer's
    /// device, written on its stream; valid until the step's last pass ran), without
    /// synchronizing; true when another forward pass is needed. CUDA optimizers only.
    bool feed_device(const float *loss_on_device) {
        int more = 0;
        check(hyzo_zo_feed_device(opt_, loss_on_device, &more));
        return more != 0;
    }
    /// Waits until every pass issued so far has finished (a no-op on the CPU).
    void synchronize() { check(hyzo_optimizer_synchronize(opt_)); }
    /// Restores the parameters of the step in progress. If restoring fails, the step is kept
    /// (the exception says so) and a second abort() retries; a second failure poisons.
    void abort() { check(hyzo_zo_abort(opt_)); }
    /// Whether a failed pass poisoned the optimizer: every call but load_state() and
    /// load_state_file() then throws, and a successful load (with the parameters of the same
    /// checkpoint written back) makes it usable again.
    bool poisoned() const {
        int p = 0;
        check(hyzo_optimizer_poisoned(opt_, &p));
        return p != 0;
    }

    /// A whole zeroth-order step; `loss_fn()` evaluates the loss at the current parameters.
    /// Returns the step's loss. If loss_fn throws, the step is aborted and the exception
    /// propagates.
    template <class F> float zo_step(F &&loss_fn) {
        begin();
        try {
            while (feed(loss_fn())) {
            }
        } catch (...) {
            hyzo_zo_abort(opt_); // best effort; the original exception wins
            throw;
        }
        return last_loss();
    }

    /// The loss of the last finished zeroth-order step: L_0 (one-sided) or the mean of the
    /// 2q perturbed losses (two-sided), reported even when the step was skipped (then it
    /// may be non-finite; see last_step_skipped()); NaN when the losses stayed on the device.
    float last_loss() const {
        float loss = 0.0f;
        int skipped = 0;
        check(hyzo_zo_last_loss(opt_, &loss, &skipped));
        return loss;
    }

    /// Whether the last finished zeroth-order step was skipped (a non-finite loss or
    /// projected gradient, spec §4); always false for losses fed from the device.
    bool last_step_skipped() const {
        float loss = 0.0f;
        int skipped = 0;
        check(hyzo_zo_last_loss(opt_, &loss, &skipped));
        return skipped != 0;
    }

    /// A first-order step on the registered gradients. One holding a NaN or an infinity
    /// skips it (nothing changes; skipped() counts it) unless cfg.skip_nonfinite_grads = 0.
    void fo_step() { check(hyzo_fo_step(opt_)); }
    /// A first-order step on the tensors with update[i] != 0 only (one flag per tensor).
    void fo_step_masked(const std::vector<std::uint8_t> &update) {
        check(hyzo_fo_step_masked(opt_, update.data(), update.size()));
    }

    /// Skips the step the schedule calls for, counted in skipped(): for a non-finite
    /// gradient or loss found on another shard or process, which must skip together.
    void skip_step() { check(hyzo_optimizer_skip_step(opt_)); }

    hyzo_phase next_phase() const {
        hyzo_phase p;
        check(hyzo_next_phase(opt_, &p));
        return p;
    }

    std::uint64_t steps() const {
        std::uint64_t steps = 0, skipped = 0;
        check(hyzo_optimizer_stats(opt_, &steps, &skipped));
        return steps;
    }

    /// Steps skipped: non-finite losses or projected gradients (zeroth-order), gradients
    /// holding a NaN or an infinity (skip_nonfinite_grads).
    std::uint64_t skipped() const {
        std::uint64_t steps = 0, skipped = 0;
        check(hyzo_optimizer_stats(opt_, &steps, &skipped));
        return skipped;
    }

    /// Updates applied to the main rule's state (its t).
    std::uint64_t updates() const {
        std::uint64_t updates = 0, fo_updates = 0;
        check(hyzo_optimizer_updates(opt_, &updates, &fo_updates));
        return updates;
    }

    /// Updates applied to the first-order rule's own state (0 without fo_rule).
    std::uint64_t fo_updates() const {
        std::uint64_t updates = 0, fo_updates = 0;
        check(hyzo_optimizer_updates(opt_, &updates, &fo_updates));
        return fo_updates;
    }

    /// Saves the state to a file, streaming and atomically (see hyzo_optimizer_save_state_file).
    void save_state_file(const char *path) const {
        check(hyzo_optimizer_save_state_file(opt_, path));
    }
    void load_state_file(const char *path) { check(hyzo_optimizer_load_state_file(opt_, path)); }

    std::vector<unsigned char> save_state() const {
        std::uint64_t size = 0;
        check(hyzo_optimizer_state_size(opt_, &size));
        std::vector<unsigned char> buf(static_cast<std::size_t>(size));
        check(hyzo_optimizer_save_state(opt_, buf.data(), size));
        return buf;
    }

    void load_state(const std::vector<unsigned char> &buf) {
        check(hyzo_optimizer_load_state(opt_, buf.data(), buf.size()));
    }

private:
    explicit Optimizer(hyzo_optimizer *o) noexcept : opt_(o) {}
    hyzo_optimizer *opt_ = nullptr;
    // Declared after opt_ and destroyed after the destructor's body has destroyed it.
    std::vector<std::shared_ptr<const void>> owners_;
};

} // namespace hyzo

#endif // HYZO_HPP
