/* A device sending a WAV file to the edge gateway for transcription, over MQTT 5 with
 * libmosquitto (Debian: libmosquitto-dev). The raw way: the WAV bytes are the payload, the
 * request id is the correlation data, the answer comes to our response topic (under
 * edge/results/<device>/), params go as user properties.
 *
 *   gcc -O2 -Wall -o device device.c -lmosquitto
 *   ./device HOST PORT DEVICE_ID speech.wav [REQUEST_ID]     -> prints the JSON answer
 *
 * Exit status: 0 with an answer (ok or error: read "status"), 1 on a local or network failure.
 * On a gateway with the shipped ACL, DEVICE_ID is your MQTT username: add
 * mosquitto_username_pw_set() and mosquitto_tls_set() before connecting.
 */
#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct job {
    const char *device, *id;
    char jobs_topic[256], reply_topic[256];
    void *wav;
    long wav_len;
    int answered;
};

static void on_connect(struct mosquitto *m, void *obj, int rc, int flags, const mosquitto_property *p)
{
    struct job *job = obj;
    (void)flags; (void)p;
    if (rc != 0) {
        fprintf(stderr, "connect refused: %s\n", mosquitto_reason_string(rc));
        mosquitto_disconnect(m);
        return;
    }
    /* subscribe first, publish once the broker confirmed it: the answer cannot slip past */
    mosquitto_subscribe_v5(m, NULL, job->reply_topic, 1, 0, NULL);
}

static void on_subscribe(struct mosquitto *m, void *obj, int mid, int n, const int *qos,
                         const mosquitto_property *p)
{
    struct job *job = obj;
    mosquitto_property *props = NULL;
    (void)mid; (void)n; (void)qos; (void)p;
    mosquitto_property_add_string(&props, MQTT_PROP_RESPONSE_TOPIC, job->reply_topic);
    mosquitto_property_add_binary(&props, MQTT_PROP_CORRELATION_DATA, job->id,
                                  (uint16_t)strlen(job->id));
    mosquitto_property_add_string(&props, MQTT_PROP_CONTENT_TYPE, "audio/wav");
    mosquitto_property_add_string_pair(&props, MQTT_PROP_USER_PROPERTY, "timestamps", "true");
    int rc = mosquitto_publish_v5(m, NULL, job->jobs_topic, (int)job->wav_len, job->wav, 1,
                                  false, props);
    mosquitto_property_free_all(&props);
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "publish failed: %s\n", mosquitto_strerror(rc));
        mosquitto_disconnect(m);
    }
}

static void on_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg,
                       const mosquitto_property *props)
{
    struct job *job = obj;
    void *corr = NULL;
    uint16_t corr_len = 0;
    /* the answer echoes our correlation data; anything else on the topic is not ours */
    if (!mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &corr, &corr_len, false))
        return;
    int ours = corr_len == strlen(job->id) && memcmp(corr, job->id, corr_len) == 0;
    free(corr);
    if (!ours)
        return;
    fwrite(msg->payload, 1, (size_t)msg->payloadlen, stdout);
    fputc('\n', stdout);
    job->answered = 1;
    mosquitto_disconnect(m);
}

static void *read_file(const char *path, long *len)
{
    FILE *f = fopen(path, "rb");
    void *buf = NULL;
    if (f && fseek(f, 0, SEEK_END) == 0 && (*len = ftell(f)) > 0 && fseek(f, 0, SEEK_SET) == 0
        && (buf = malloc((size_t)*len)) && fread(buf, 1, (size_t)*len, f) != (size_t)*len) {
        free(buf);
        buf = NULL;
    }
    if (f)
        fclose(f);
    return buf;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s HOST PORT DEVICE_ID FILE.wav [REQUEST_ID]\n", argv[0]);
        return 1;
    }
    struct job job = {.device = argv[3], .id = argc > 5 ? argv[5] : "c-asr-1"};
    snprintf(job.jobs_topic, sizeof job.jobs_topic, "edge/jobs/asr/%s", job.device);
    snprintf(job.reply_topic, sizeof job.reply_topic, "edge/results/%s/%s", job.device, job.id);
    if (!(job.wav = read_file(argv[4], &job.wav_len))) {
        perror(argv[4]);
        return 1;
    }
    mosquitto_lib_init();
    struct mosquitto *m = mosquitto_new(NULL, true, &job);
    mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
    mosquitto_connect_v5_callback_set(m, on_connect);
    mosquitto_subscribe_v5_callback_set(m, on_subscribe);
    mosquitto_message_v5_callback_set(m, on_message);
    int rc = mosquitto_connect_bind_v5(m, argv[1], atoi(argv[2]), 60, NULL, NULL);
    if (rc == MOSQ_ERR_SUCCESS)
        rc = mosquitto_loop_forever(m, -1, 1);  /* returns once on_message disconnects */
    if (rc != MOSQ_ERR_SUCCESS && !job.answered)
        fprintf(stderr, "mqtt: %s\n", mosquitto_strerror(rc));
    mosquitto_destroy(m);
    mosquitto_lib_cleanup();
    free(job.wav);
    return job.answered ? 0 : 1;
}
